"""Fine-tune a checkpoint (continued causal-LM training) on your own text files: a Hugging Face Llama directory or a
llama_jax run (a workdir, or one step of it such as runs/tiny/checkpoints/300).

    python -m llama_jax.train --config configs/finetune.py:path/to/hf_dir --config.data.source='my_docs/*.md'

The model section, the starting weights and the tokenizer all come from the checkpoint (passed after the colon), so
text is framed exactly as its tokenizer says. Only the parameters are taken: the optimizer state, step and data
position start afresh. Export the result with `python -m llama_jax.convert --from ours --to hf runs/finetune my-model/`.
"""

from llama_jax.config import default_config, pretrained_model_section, pretrained_tokenizer
from llama_jax.errors import ConfigError


def get_config(checkpoint: str = ""):
    if not checkpoint:
        raise ConfigError("configs/finetune.py needs the checkpoint: --config configs/finetune.py:PATH")
    cfg = default_config()
    cfg.model = pretrained_model_section(checkpoint)
    cfg.checkpoint.init_from = checkpoint
    cfg.data.tokenizer = pretrained_tokenizer(checkpoint)
    cfg.data.batch_size = 8
    cfg.data.seq_len = 512
    cfg.optim.lr = 1e-5  # the Llama 3 post-training rate: fine-tuning moves pretrained weights only a little
    cfg.optim.warmup_steps = 10
    cfg.train.steps = 100
    cfg.train.eval_every = 50
    cfg.checkpoint.every_steps = 50
    return cfg

"""Fine-tune a Hugging Face Llama checkpoint (continued causal-LM training) on your own text files.

    python -m llama_jax.train --config configs/finetune_hf.py:path/to/hf_dir --config.data.source='my_docs/*.md'

The model section, the starting weights and the tokenizer all come from the checkpoint directory (passed after the
colon), so text is framed exactly as its tokenizer files say. Export the result with
`python -m llama_jax.convert --from ours --to hf --source runs/finetune_hf --out my-model/`.
"""

from llama_jax.config import default_config, hf_model_section
from llama_jax.errors import ConfigError


def get_config(hf_dir: str = ""):
    if not hf_dir:
        raise ConfigError("configs/finetune_hf.py needs the checkpoint directory: --config configs/finetune_hf.py:PATH")
    cfg = default_config()
    cfg.model = hf_model_section(hf_dir)
    cfg.checkpoint.init_from = hf_dir
    cfg.data.tokenizer = hf_dir
    cfg.data.batch_size = 8
    cfg.data.seq_len = 512
    cfg.optim.lr = 1e-5  # the Llama 3 post-training rate: fine-tuning moves pretrained weights only a little
    cfg.optim.warmup_steps = 10
    cfg.train.steps = 100
    cfg.train.eval_every = 50
    cfg.checkpoint.every_steps = 50
    return cfg

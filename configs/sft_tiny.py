"""Supervised fine-tuning (objective "sft") of a checkpoint on questions about standard-library functions answered by
their docstrings: the Llama 3 recipe's SFT (loss on the assistant's tokens only, conversations packed whole, multi-turn)
at a size that runs on a CPU with no download.

    python -m llama_jax.train --config configs/sft_tiny.py:runs/tiny --workdir runs/sft_tiny

The argument is the checkpoint to start from (a llama_jax run such as the default job's, or a Hugging Face directory):
the model section, starting weights and tokenizer all come from it. The chat data (about 260 conversations) is
built and prepared with that tokenizer under data.cache_dir on first use (llama_jax/data/stdlib_chat.py). For your
own conversations: python -m llama_jax.data.prepare --chat --source CHATS.jsonl --tokenizer T --out DIR, then
--config.data.source=DIR.
"""

from llama_jax.config import default_config, pretrained_model_section, pretrained_tokenizer
from llama_jax.errors import ConfigError


def get_config(checkpoint: str = ""):
    if not checkpoint:
        raise ConfigError("configs/sft_tiny.py needs the checkpoint to fine-tune: --config configs/sft_tiny.py:PATH")
    cfg = default_config()
    cfg.model = pretrained_model_section(checkpoint)
    cfg.checkpoint.init_from = checkpoint
    cfg.data.tokenizer = pretrained_tokenizer(checkpoint)
    cfg.data.source = "stdlib_chat"  # prepared under data.cache_dir when the run opens its data
    cfg.objective.name = "sft"
    cfg.data.batch_size = 8
    cfg.data.seq_len = 256
    cfg.data.eval_batches = 2
    # Llama 3 fine-tuned at 1e-5 (8B-405B, ~9K steps); a 5M-parameter model on 260 conversations needs a larger step.
    cfg.optim.lr = 3e-4
    cfg.optim.warmup_steps = 5
    cfg.optim.weight_decay = 0.0
    cfg.train.steps = 60
    cfg.train.log_every = 5
    cfg.train.eval_every = 20
    cfg.checkpoint.every_steps = 60
    return cfg

"""Direct preference optimisation (objective "dpo") of a chat checkpoint, Llama 3's variant: beta 0.1, the header
and end tokens masked out of the log-probabilities, 0.2 x NLL on the chosen response, the reference the frozen
starting weights. The pairs prefer a standard-library function's docstring to another function's with its words
shuffled, as the answer to "What does `X` do?".

    python -m llama_jax.train --config configs/dpo_tiny.py:runs/sft_tiny --workdir runs/dpo_tiny

The argument is the checkpoint to start from (usually the SFT run's); the pairs are built and prepared with its
tokenizer under data.cache_dir on first use. For your own pairs: python -m llama_jax.data.preferences --source
PAIRS.jsonl --tokenizer T --out DIR, then --config.data.source=DIR. With --config.objective.name=reward the same
config trains a reward model (a scalar head on the last hidden state) on the same pairs.
"""

from llama_jax.config import default_config, pretrained_model_section, pretrained_tokenizer
from llama_jax.errors import ConfigError


def get_config(checkpoint: str = ""):
    if not checkpoint:
        raise ConfigError("configs/dpo_tiny.py needs the checkpoint to start from: --config configs/dpo_tiny.py:PATH")
    cfg = default_config()
    cfg.model = pretrained_model_section(checkpoint)
    cfg.checkpoint.init_from = checkpoint
    cfg.data.tokenizer = pretrained_tokenizer(checkpoint)
    cfg.data.source = "stdlib_preferences"  # prepared under data.cache_dir when the run opens its data
    cfg.objective.name = "dpo"
    cfg.objective.dpo_beta = 0.1
    cfg.objective.dpo_nll = 0.2
    cfg.data.batch_size = 8  # pairs
    cfg.data.seq_len = 256
    cfg.data.eval_batches = 2
    cfg.optim.lr = 1e-4  # Llama 3: 1e-5 at 8B-405B
    cfg.optim.warmup_steps = 5
    cfg.optim.weight_decay = 0.0
    cfg.train.steps = 40
    cfg.train.log_every = 5
    cfg.train.eval_every = 20
    cfg.checkpoint.every_steps = 40
    return cfg

"""The tiny model on a weighted mixture of three texts every Python installation has: the standard library's code
(40%), its docstrings (35%) and the prose documentation topics of pydoc_data (25%).

    python -m llama_jax.train --config configs/stdlib_mix.py                    # raw text, tokenized on first use
    bash data/prepare_stdlib_mix.sh /tmp/stdlib_mix                             # or: prepare shards once,
    python -m llama_jax.train --config configs/stdlib_mix.py:/tmp/stdlib_mix    # then train on them

The log shows each source's realised share (mixture/<name>) and its own held-out loss (eval_loss/<name>).
"""

from llama_jax.config import default_config, model_section
from llama_jax.data.recipes import stdlib_mixture


def get_config(prepared_dir: str = ""):
    cfg = default_config()
    cfg.model = model_section("tiny", attention="xla", remat="none")
    cfg.data.mixture = stdlib_mixture(prepared_dir)
    if prepared_dir:
        cfg.data.tokenizer = f"{prepared_dir}/tokenizer.model"  # the shards' tokenizer, written by the script
    cfg.data.batch_size = 16
    cfg.data.seq_len = 256
    cfg.optim.lr = 3e-3
    cfg.optim.warmup_steps = 30
    cfg.train.steps = 300
    cfg.train.eval_every = 50
    cfg.checkpoint.every_steps = 100
    return cfg

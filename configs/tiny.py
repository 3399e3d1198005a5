"""The default job: a ~5M-parameter Llama 3-architecture model on the Python standard library's sources.

Runs on any machine with no download: the first run builds the corpus and trains a 8,192-token BPE
tokenizer (cached under data.cache_dir). About 10 minutes on a 2-core CPU.
"""

from llama_jax.config import default_config


def get_config():
    cfg = default_config()
    cfg.model.attention = "xla"
    cfg.train.steps = 600
    cfg.train.eval_every = 100
    return cfg

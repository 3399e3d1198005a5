"""The default job: a 5.2M-parameter Llama 3-architecture model on the Python standard library's sources.

Runs on any machine with no download: the first run builds the corpus (about 8M tokens) and trains an
8,192-token byte-level BPE tokenizer, cached under data.cache_dir. 5 to 10 minutes on a 2-core CPU.
"""

from llama_jax.config import default_config, model_section


def get_config():
    cfg = default_config()
    # dim 256, 4 layers, 8 heads / 4 KV heads, SwiGLU 768, tied embeddings, vocabulary 8,192.
    # Small enough to keep all activations; 4 layers compile quickly unrolled, and unrolled run 20% faster on CPU.
    cfg.model = model_section("tiny", attention="xla", remat="none", scan_layers=False)
    cfg.data.batch_size = 16
    cfg.data.seq_len = 256  # 4,096 tokens per step
    cfg.optim.lr = 3e-3
    cfg.optim.warmup_steps = 30
    cfg.train.steps = 300
    cfg.train.log_every = 10
    cfg.train.eval_every = 50
    cfg.checkpoint.every_steps = 100
    return cfg

"""Every phase of the Llama 3 pretraining recipe, scaled down to the tiny model and the built-in text (1.5M tokens, no
download; its time and losses on a 2-core CPU are in the README).

    python -m llama_jax.train --config configs/llama3_recipe_tiny.py
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python -m llama_jax.train --config configs/llama3_recipe_tiny.py:devices=2   # long context over 2 devices
    python -m llama_jax.train --config configs/llama3_recipe_tiny.py:scale=0.08      # every phase, in 2 minutes

The same phases as configs/llama3_405b.py (llama_jax/recipe.py), with the paper's numbers scaled down:
- pretraining on the stdlib mixture, 1K-token steps of 64-token sequences, 2K of 128 after 100K tokens, 4K after 400K,
  1.06M tokens in all, warmup then cosine;
- long context: 256, then 512-token sequences (4K-token steps), with the llama3 RoPE scaling (factor 4 over the
  128-token pretraining context) and, given devices > 1, a context-parallel axis of 2;
- annealing: 40K tokens on the prose-heavy part of the mixture (docstrings and documentation topics), the learning
  rate linearly to 0, a checkpoint every other step, their average written to WORKDIR/averaged and evaluated.
"""

import ml_collections

from llama_jax.config import default_config, mixture_source, model_section
from llama_jax.data.recipes import stdlib_mixture
from llama_jax.errors import ConfigError
from llama_jax.recipe import apply_llama3_recipe, llama3_stages


def get_config(options: str = ""):
    """`options`: comma-separated `devices=N` (N > 1: context parallelism in the long phases) and `scale=F` (the
    token budgets of pretraining and long context times F, at least a step each; annealing keeps its 10 steps)."""
    settings = dict(devices=1, scale=1.0)
    for item in filter(None, options.split(",")):
        name, _, value = item.partition("=")
        try:
            settings[name] = type(settings[name])(value)
        except (KeyError, ValueError):
            raise ConfigError(f"configs/llama3_recipe_tiny.py: option {item!r} is not devices=N (an integer) or "
                              "scale=F (a number), e.g. --config configs/llama3_recipe_tiny.py:devices=2,scale=0.08"
                              ) from None
    context = 2 if settings["devices"] > 1 else 1
    scale = settings["scale"]
    cfg = default_config()
    cfg.model = model_section("tiny", attention="xla", remat="none")
    cfg.data.mixture = stdlib_mixture()
    cfg.data.eval_batches = 4
    cfg.optim.lr = 3e-3
    cfg.optim.warmup_steps = 30
    cfg.train.log_every = 20
    cfg.train.eval_every = 100
    cfg.checkpoint.every_steps = 100
    stages = llama3_stages(total_tokens=int(1_500_000 * scale), long_context_lengths=(256, 512),
                           long_context_tokens=int(400_000 * scale), anneal_tokens=40_960,
                           ramp_tokens=(int(100_000 * scale), int(400_000 * scale)), tokens_per_step=(1024, 2048, 4096),
                           seq_lens=(64, 128))
    anneal_mixture = ml_collections.ConfigDict({"pydoc_topics": mixture_source("pydoc_topics", 0.5),
                                                "stdlib_docstrings": mixture_source("stdlib_docstrings", 0.5)})

    def layout(seq_len: int, batch_size: int) -> dict:
        return {"mesh": {"context": context if seq_len >= 256 else 1}}

    apply_llama3_recipe(cfg, stages, layout, anneal_mixture=anneal_mixture,
                        long_context_rope=dict(rope_type="llama3", rope_factor=4.0, rope_original_max_len=128))
    return cfg

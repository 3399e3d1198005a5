"""How the layer stack runs on a mesh: the one place that combines pipeline stages, context-parallel attention and
the activations' sharding at block boundaries into the `LayersFn` the model is called with."""

from __future__ import annotations

import functools

from jax.sharding import Mesh

from llama_jax.model import LlamaConfig
from llama_jax.model.attention import ATTENTION
from llama_jax.model.llama import LayersFn, apply_blocks
from llama_jax.parallel.context import context_attention
from llama_jax.parallel.mesh import constrain
from llama_jax.parallel.pipeline import pipeline_layers


def make_layers_fn(model_cfg: LlamaConfig, mesh: Mesh, *, microbatches: int = 1, repeats: int = 1) -> LayersFn:
    """Blocks in order (or pipelined over `stage` with `microbatches`, `repeats` chunks per stage), each block's
    output kept split over batch and length only: between blocks the residual stream is never split over tensor
    (each tensor-parallel block ends in a row-parallel matmul whose partial sums are reduced there)."""
    context = mesh.shape["context"]
    attention = context_attention(model_cfg.attention, context) if context > 1 else ATTENTION[model_cfg.attention]
    run = functools.partial(apply_blocks, remat=model_cfg.remat, attention=attention,
                            after_block=lambda x_btd: constrain(x_btd, ("batch", "length", None)))
    if mesh.shape["stage"] == 1:
        return run
    return functools.partial(pipeline_layers, stages=mesh.shape["stage"], microbatches=microbatches,
                             repeats=repeats, run_chunk=run)

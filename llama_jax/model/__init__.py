"""The Llama 3 model: configuration, presets and the Flax NNX module."""

from llama_jax.model.config import LlamaConfig, flops_per_token, param_count
from llama_jax.model.llama import Llama, ModelDef
from llama_jax.model.presets import PRESETS, preset

__all__ = ["Llama", "LlamaConfig", "ModelDef", "PRESETS", "flops_per_token", "param_count", "preset"]

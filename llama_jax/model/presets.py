"""Published Llama 3 shapes, and small sizes for tests and CPU runs.

Shapes and RoPE settings follow Meta's model cards / Hugging Face configs. Llama 3.1, 3.2 and 3.3 use the
llama3 RoPE scaling (factor 8; 32 for the 3.2 models) and a 131,072-token context.
"""

from __future__ import annotations

from llama_jax.errors import ConfigError
from llama_jax.model.config import LlamaConfig

_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, rope_type="llama3", max_seq_len=131072, norm_eps=1e-5)

PRESETS: dict[str, LlamaConfig] = {
    "llama3.2-1b": LlamaConfig(
        **_LLAMA3, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, ffn_dim=8192,
        tie_embeddings=True, rope_factor=32.0,
    ),
    "llama3.2-3b": LlamaConfig(
        **_LLAMA3, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128, ffn_dim=8192,
        tie_embeddings=True, rope_factor=32.0,
    ),
    "llama3.1-8b": LlamaConfig(**_LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336),
    "llama3.1-70b": LlamaConfig(**_LLAMA3, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    "llama3.1-405b": LlamaConfig(**_LLAMA3, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248),
    # Small research sizes (same architecture; vocabulary set by the tokenizer in use).
    "debug": LlamaConfig(
        vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=1024,
        rope_type="default", rope_theta=10000.0, tie_embeddings=True,
    ),
    "tiny": LlamaConfig(
        vocab_size=8192, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, max_seq_len=2048,
        rope_type="default", rope_theta=10000.0, tie_embeddings=True,
    ),
    "small": LlamaConfig(
        vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536, max_seq_len=4096,
        rope_type="default", rope_theta=10000.0, tie_embeddings=True,
    ),
    "medium": LlamaConfig(
        vocab_size=32000, dim=1024, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=3072, max_seq_len=4096,
        rope_type="default", rope_theta=10000.0,
    ),
}
PRESETS["llama3.3-70b"] = PRESETS["llama3.1-70b"]


def preset(name: str, **overrides) -> LlamaConfig:
    """A preset by name, with any field overridden (e.g. `preset("llama3.1-8b", attention="reference")`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)

"""The model's hyper-parameters, and the counts derived from them (parameters, training FLOPs).

`LlamaConfig` is frozen and validated on construction so that a bad shape fails before any array is made.
"""

from __future__ import annotations

import dataclasses

from llama_jax.errors import ConfigError

# cudnn and triton: NVIDIA GPUs only; splash: TPUs only (model/fused_attention.py)
ATTENTION_IMPLS = ("reference", "xla", "flash", "cudnn", "triton", "splash")
PALLAS_ATTENTION = ("triton", "splash")  # Pallas calls: opaque to XLA's partitioner (see parallel/layers.py)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ROPE_TYPES = ("default", "llama3")
# How a model runs, not what it computes: a run may choose these freely when it starts from a checkpoint.
RUNTIME_FIELDS = ("dtype", "param_dtype", "attention", "remat", "scan_layers", "init_std", "max_seq_len")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 128256
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 0  # 0 means dim // n_heads
    ffn_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_type: str = "llama3"  # "default": plain RoPE; "llama3": Llama 3.1 frequency scaling
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    max_seq_len: int = 131072
    tie_embeddings: bool = False
    dtype: str = "bfloat16"  # compute dtype; parameters stay float32
    param_dtype: str = "float32"
    attention: str = "xla"  # one of ATTENTION_IMPLS
    remat: str = "dots_no_batch"  # one of REMAT_POLICIES
    scan_layers: bool = True  # False: the layers unrolled (compile time grows with depth; see llama.apply_blocks)
    init_std: float = 0.02

    def __post_init__(self):
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name in ("norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim < 0:
            raise ConfigError(f"model.head_dim must be positive, or 0 for dim // n_heads; got {self.head_dim}")
        if self.init_std < 0:
            raise ConfigError(f"model.init_std must be zero or positive, got {self.init_std}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads}) "
                "for grouped-query attention: change one of them"
            )
        if self.head_dim == 0 and self.dim % self.n_heads:
            raise ConfigError(
                f"model.dim ({self.dim}) is not divisible by model.n_heads ({self.n_heads}): "
                "set model.head_dim explicitly or change the head count"
            )
        if self.resolved_head_dim % 2:
            raise ConfigError(f"the head dimension must be even for RoPE, got {self.resolved_head_dim}")
        for name, allowed in (("attention", ATTENTION_IMPLS), ("remat", REMAT_POLICIES), ("rope_type", ROPE_TYPES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.rope_type == "llama3":
            self._check_llama3_rope()
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"model.scan_layers={self.scan_layers!r} must be True (scan over the layers) or False "
                              "(unrolled)")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"model.{name}={getattr(self, name)!r}: use float32, bfloat16 or float16")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise ConfigError("model.attention='cudnn' computes in bfloat16 or float16 only, and model.dtype is "
                              "float32: set model.dtype='bfloat16' or choose another attention")

    def _check_llama3_rope(self) -> None:
        """The llama3 scaling divides by rope_original_max_len, each factor and their difference: a zero in any gave
        NaN frequencies (a model that trains on NaN), a factor below 1 a context shorter than the original."""
        if self.rope_factor < 1:
            raise ConfigError(f"model.rope_factor={self.rope_factor} must be at least 1: it stretches the original "
                              "context (Llama 3.1: 8, Llama 3.2: 32)")
        if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ConfigError(f"model.rope_low_freq_factor={self.rope_low_freq_factor} and rope_high_freq_factor="
                              f"{self.rope_high_freq_factor} must be positive, low below high (Llama 3.1: 1 and 4)")
        if self.rope_original_max_len <= 0:
            raise ConfigError(f"model.rope_original_max_len={self.rope_original_max_len} must be positive: the "
                              "context the model was pretrained at (Llama 3.1: 8192)")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def architecture_changes(self, saved: "LlamaConfig") -> list[str]:
        """`model.KEY=ours (checkpoint: theirs)` for each field, other than RUNTIME_FIELDS, in which this config
        differs from a checkpoint's: the reasons its weights cannot start this model. A `head_dim` of 0 (dim /
        n_heads) and the number a converted checkpoint states are one model."""
        def differs(name: str) -> bool:
            if name == "head_dim" and self.resolved_head_dim == saved.resolved_head_dim:
                return False
            return getattr(self, name) != getattr(saved, name)

        return [f"model.{f.name}={getattr(self, f.name)!r} (checkpoint: {getattr(saved, f.name)!r})"
                for f in dataclasses.fields(self) if f.name not in RUNTIME_FIELDS and differs(f.name)]


def param_count(cfg: LlamaConfig, *, include_embedding: bool = True) -> int:
    """Parameter count from the shapes alone (nothing is allocated).

    `include_embedding=False` leaves out the input embedding table only; an untied output projection is a
    real matmul and stays in.
    """
    h = cfg.resolved_head_dim
    attn = cfg.dim * h * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 3 * cfg.dim * cfg.ffn_dim
    norms = 2 * cfg.dim
    embedding = cfg.vocab_size * cfg.dim
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    total = cfg.n_layers * (attn + mlp + norms) + cfg.dim + head
    return total + embedding if include_embedding else total


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (matmul parameters) + 12 * layers * heads * head_dim * seq_len.

    The first term counts forward and backward passes through every weight matrix, the output projection
    included even when tied; the second is attention's score and value products (Llama 3 paper, MFU).
    """
    matmul_params = param_count(cfg, include_embedding=False) + (cfg.vocab_size * cfg.dim if cfg.tie_embeddings else 0)
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * seq_len

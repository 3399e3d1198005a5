"""Rotary position embeddings, with Llama 3.1's frequency scaling for long context.

Rotation uses the half-split layout (first half of the head paired with the second half), the layout of
Hugging Face checkpoints, so converting them is a plain copy.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from llama_jax.model.config import LlamaConfig


def inverse_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """Per-pair rotation frequencies [head_dim // 2], computed once on the host in float64."""
    h = cfg.resolved_head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    if cfg.rope_type == "llama3":
        inv_freq = _llama3_scaling(inv_freq, cfg)
    return inv_freq.astype(np.float32)


def _llama3_scaling(inv_freq: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
    """Slows low frequencies by `rope_factor`, keeps high ones, and blends smoothly in between.

    Wavelengths longer than original_len / low_freq_factor are divided by the factor; shorter than
    original_len / high_freq_factor are kept; the band between interpolates linearly in original_len / wavelength.
    """
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor
    high_freq_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor
    smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / cfg.rope_factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, blended, scaled)


def rotary_angles(positions_bt: jnp.ndarray, inv_freq_p: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin [b, t, head_dim // 2] in float32 for integer positions."""
    angles_btp = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_p)
    return jnp.cos(angles_btp), jnp.sin(angles_btp)


def apply_rotary(x_btnh: jnp.ndarray, cos_btp: jnp.ndarray, sin_btp: jnp.ndarray) -> jnp.ndarray:
    """Rotates each (i, i + head_dim/2) pair by its angle; math in float32, result in x's dtype."""
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos_btp[:, :, None, :], sin_btp[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_btnh.dtype)

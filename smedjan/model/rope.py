"""Rotary position embeddings with the scalings transformers implements.

Each `rope_type` follows `transformers.modeling_rope_utils` formula for formula, so
logits match HF; see that module for the papers behind each scheme.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from smedjan.config import ModelConfig


def _base_inv_freq(base, dim: int):
    return 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def inv_freq_and_scale(cfg: ModelConfig, seq_len=None):
    """Inverse frequencies [head_dim/2] and the factor applied to cos/sin.

    `seq_len` matters only for dynamic NTK, which grows the base once the sequence
    runs past max_position_embeddings (it may be a traced value).
    """
    dim, base = cfg.head_dim, cfg.rope_theta
    rs = cfg.rope_scaling or {}
    kind = cfg.rope_type
    if kind == "default":
        return _base_inv_freq(base, dim), 1.0
    factor = float(rs["factor"])
    if kind == "linear":
        return _base_inv_freq(base, dim) / factor, 1.0
    if kind == "dynamic":
        mpe = cfg.max_position_embeddings
        s = jnp.maximum(jnp.asarray(mpe if seq_len is None else seq_len, jnp.float32), mpe)
        new_base = base * ((factor * s / mpe) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(new_base, dim), 1.0
    if kind == "llama3":
        inv = _base_inv_freq(base, dim)
        old = rs["original_max_position_embeddings"]
        low_wl, high_wl = old / rs["low_freq_factor"], old / rs["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return jnp.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(cfg, rs, factor)
    raise ValueError(kind)


def _yarn(cfg: ModelConfig, rs: dict, factor: float):
    dim, base = cfg.head_dim, cfg.rope_theta
    omp = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = rs.get("attention_factor")
    if attn_factor is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attn_factor = mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"])
        else:
            attn_factor = mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rot):
        return (dim * math.log(omp / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attn_factor)


def rope_cos_sin(cfg: ModelConfig, positions, seq_len=None):
    """cos, sin of shape [B, S, head_dim] for integer positions [B, S], in float32."""
    inv, scale = inv_freq_and_scale(cfg, seq_len)
    angles = positions[..., None].astype(jnp.float32) * inv
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x, cos, sin):
    """x [B, S, H, D]; HF's rotate-half convention (not interleaved pairs)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin

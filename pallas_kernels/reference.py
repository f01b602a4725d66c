"""Pure-jnp float32 references for the Pallas kernels.

These materialise the full mask / score matrix and are meant for tests only.
Masking conventions (shared with the kernels):

* ``causal``: query i sees key j iff j <= i (top-left aligned, as
  ``jax.nn.dot_product_attention``).
* ``sliding_window=W``: query i sees key j iff i - W < j <= i (Mistral / HF:
  W keys including itself).  A window implies causality.
* ``segment_ids`` [B, S]: query and key must carry the same id.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def attention_mask(S, T, *, causal=True, sliding_window=None, segment_ids=None):
    """[B or 1, 1, S, T] boolean mask."""
    qi = jnp.arange(S)[:, None]
    kj = jnp.arange(T)[None, :]
    mask = jnp.ones((S, T), bool)
    if causal or sliding_window is not None:
        mask &= kj <= qi
    if sliding_window is not None:
        mask &= kj > qi - sliding_window
    mask = mask[None, None]
    if segment_ids is not None:
        seg = segment_ids
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
    return mask


def attention_reference(q, k, v, *, causal=True, sliding_window=None, segment_ids=None, sm_scale=None):
    """q [B,S,Hq,D], k/v [B,T,Hkv,D] -> [B,S,Hq,D] float32."""
    B, S, Hq, D = q.shape
    T, Hkv = k.shape[1], k.shape[2]
    sm_scale = D**-0.5 if sm_scale is None else sm_scale
    g = Hq // Hkv
    q, k, v = q.astype(f32), k.astype(f32), v.astype(f32)
    k = jnp.repeat(k, g, axis=2)
    v = jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bshd,bthd->bhst", q, k, precision=jax.lax.Precision.HIGHEST) * sm_scale
    mask = attention_mask(S, T, causal=causal, sliding_window=sliding_window, segment_ids=segment_ids)
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask, p, 0.0)  # rows with no visible key -> zeros, not NaN
    return jnp.einsum("bhst,bthd->bshd", p, v, precision=jax.lax.Precision.HIGHEST)


def decode_attention_reference(q, k_cache, v_cache, q_positions, *, sliding_window=None, sm_scale=None):
    """q [B,Sq,Hq,D], caches [B,T,Hkv,D], q_positions [B,Sq] -> [B,Sq,Hq,D]."""
    B, Sq, Hq, D = q.shape
    T, Hkv = k_cache.shape[1], k_cache.shape[2]
    sm_scale = D**-0.5 if sm_scale is None else sm_scale
    g = Hq // Hkv
    q = q.astype(f32)
    k = jnp.repeat(k_cache.astype(f32), g, axis=2)
    v = jnp.repeat(v_cache.astype(f32), g, axis=2)
    s = jnp.einsum("bshd,bthd->bhst", q, k, precision=jax.lax.Precision.HIGHEST) * sm_scale
    pos = q_positions[:, None, :, None]
    j = jnp.arange(T)[None, None, None, :]
    mask = j <= pos
    if sliding_window is not None:
        mask &= j > pos - sliding_window
    s = jnp.where(mask, s, -jnp.inf)
    p = jnp.where(mask, jax.nn.softmax(s, axis=-1), 0.0)
    return jnp.einsum("bhst,bthd->bshd", p, v, precision=jax.lax.Precision.HIGHEST)


def matmul_reference(a, b):
    return jnp.dot(a.astype(f32), b.astype(f32), precision=jax.lax.Precision.HIGHEST)


def int8_matmul_reference(x, w_int8, scales):
    w = w_int8.astype(f32) * scales.astype(f32)[None, :]
    return jnp.dot(x.astype(f32), w, precision=jax.lax.Precision.HIGHEST)


def int4_matmul_reference(x, packed, scales, offsets, group_size):
    """x @ w for `pallas_kernels.int4_matmul`'s packed layout, unpacked here independently: in each
    group of `group_size` rows, byte row j holds row j (low nibble) and row j + group_size/2 (high)."""
    K2, N = packed.shape
    h = group_size // 2
    p = packed.astype(jnp.int32).reshape(K2 // h, h, N)
    q = jnp.concatenate([p % 16, p // 16], axis=1).astype(f32)  # [groups, group_size, N]
    w = q * scales.astype(f32)[:, None, :] + offsets.astype(f32)[:, None, :]
    return jnp.dot(x.astype(f32), w.reshape(2 * K2, N), precision=jax.lax.Precision.HIGHEST)

"""Decode attention (a few query tokens against a long KV cache), split-K.

q [B, Sq, Hq, D] with small Sq (1..16), caches [B, T, Hkv, D],
q_positions int32 [B, Sq] (absolute positions).  Query at position p sees
cache entries j <= p (and j > p - W with ``sliding_window=W``).

Why split-K ("flash decoding"): with B * Hkv small (e.g. 1 x 8) a kernel with
one program per head would use 8 of 132 SMs and be latency bound.  We cut the
cache into ``splits`` contiguous chunks, give every (chunk, batch, kv head) a
program, and each program produces an *unnormalised* partial result
(acc, running max m, normaliser l).  A tiny XLA epilogue merges the partials
with the usual log-sum-exp rescaling.

GQA: all q heads that share a kv head (and all Sq query tokens) are packed as
rows of one [rows, D] tile, so each K/V block loaded from HBM is used by every
head of its group (the kernel is bandwidth bound: bytes of cache read once).
Blocks beyond the largest query position (or before the window of the
smallest) are skipped, so a short prefix of a long pre-allocated cache costs
only what it holds.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._compat import block_spec, next_pow2, resolve_interpret, round_up, triton_params

f32 = jnp.float32
MASK_VALUE = -1e30
LOG2E = math.log2(math.e)


def _decode_kernel(
    q_ref, pos_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, block_k, blocks_per_split, nk, seq_k, window, c
):
    split = pl.program_id(0)
    q = q_ref[...]  # [br, D]
    pos = pos_ref[...]  # [br] absolute positions of these rows
    br, D = q.shape

    # Blocks this program owns, clipped to what any of its rows can see.
    lo = split * blocks_per_split
    hi = jnp.minimum(lo + blocks_per_split, nk)
    hi = jnp.minimum(hi, lax.div(jnp.max(pos), block_k) + 1)
    if window is not None:
        first = jnp.maximum(jnp.min(pos) - window + 1, 0)
        lo = jnp.maximum(lo, lax.div(first, block_k))

    def body(kb, carry):
        acc, m, l = carry
        start = pl.multiple_of(kb * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=f32)
        j = start + jnp.arange(block_k)
        mask = (j[None, :] <= pos[:, None]) & (j[None, :] < seq_k)
        if window is not None:
            mask = mask & (j[None, :] > pos[:, None] - window)
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2((m - m_new) * c)
        p = jnp.exp2(s * c - (m_new * c)[:, None])
        # A row whose every key so far is masked has m_new == MASK_VALUE and
        # p == 1; zero those explicitly so the partial stays exact.
        p = jnp.where(mask, p, 0.0)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=f32
        )
        return acc, m_new, l

    carry = (jnp.zeros((br, D), f32), jnp.full((br,), MASK_VALUE, f32), jnp.zeros((br,), f32))
    acc, m, l = lax.fori_loop(lo, jnp.maximum(hi, lo), body, carry)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _pick_block_k(T):
    for bk in (128, 64, 32, 16):
        if T % bk == 0:
            return bk
    return 64


@functools.partial(
    jax.jit,
    static_argnames=("sliding_window", "sm_scale", "interpret", "block_k", "num_splits", "num_warps", "num_stages"),
)
def decode_attention(
    q,
    k_cache,
    v_cache,
    q_positions,
    *,
    sliding_window=None,
    sm_scale=None,
    interpret=None,
    block_k=None,
    num_splits=None,
    num_warps=4,
    num_stages=3,
):
    """Attention of a few new tokens against a KV cache.  Forward only.

    q [B, Sq, Hq, D], k_cache/v_cache [B, T, Hkv, D], q_positions [B, Sq]
    -> [B, Sq, Hq, D] in q's dtype.  ``block_k``/``num_splits``/``num_warps``/
    ``num_stages`` are tuning knobs.
    """
    B, Sq, Hq, D = q.shape
    _, T, Hkv, _ = k_cache.shape
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    G = Hq // Hkv
    interpret = resolve_interpret(interpret)
    c = float(D**-0.5 if sm_scale is None else sm_scale) * LOG2E

    # --- pack (query token, head-in-group) pairs as rows per kv head --------
    R = Sq * G
    Rp = max(16, next_pow2(R))  # tensor-core tile needs >= 16 rows
    br = min(Rp, 64)  # cap the register tile
    nr = Rp // br
    Dp = max(16, next_pow2(D))
    qr = q.reshape(B, Sq, Hkv, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, R, D)
    pos = jnp.broadcast_to(q_positions.astype(jnp.int32)[:, :, None], (B, Sq, G)).reshape(B, R)
    if Rp != R or Dp != D:
        qr = jnp.pad(qr, ((0, 0), (0, 0), (0, Rp - R), (0, Dp - D)))
    if Rp != R:
        # Padded rows copy the last real position: keeps block bounds tight.
        pos = jnp.pad(pos, ((0, 0), (0, Rp - R)), mode="edge")

    # --- the cache is big: only pad it when T has no power-of-two divisor ----
    bk = block_k or _pick_block_k(T)
    Tp = round_up(T, bk)
    kc, vc = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
    if Tp != T or Dp != D:
        padw = ((0, 0), (0, Tp - T), (0, 0), (0, Dp - D))
        kc, vc = jnp.pad(kc, padw), jnp.pad(vc, padw)
    nk = Tp // bk

    # --- split the cache so that the grid covers the GPU (~2 waves) ----------
    if num_splits is None:
        num_splits = max(1, min(nk, -(-264 // (B * Hkv * nr))))
    bps = -(-nk // num_splits)  # kv blocks per split
    splits = -(-nk // bps)

    kernel = functools.partial(
        _decode_kernel, block_k=bk, blocks_per_split=bps, nk=nk, seq_k=T, window=sliding_window, c=c
    )
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(splits, B, Hkv, nr),
        in_specs=[
            block_spec((None, None, br, Dp), lambda s, b, h, r: (b, h, r, 0)),
            block_spec((None, br), lambda s, b, h, r: (b, r)),
            block_spec((None, Tp, None, Dp), lambda s, b, h, r: (b, 0, h, 0)),
            block_spec((None, Tp, None, Dp), lambda s, b, h, r: (b, 0, h, 0)),
        ],
        out_specs=[
            block_spec((None, None, None, br, Dp), lambda s, b, h, r: (b, h, s, r, 0)),
            block_spec((None, None, None, br), lambda s, b, h, r: (b, h, s, r)),
            block_spec((None, None, None, br), lambda s, b, h, r: (b, h, s, r)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, Hkv, splits, Rp, Dp), f32),
            jax.ShapeDtypeStruct((B, Hkv, splits, Rp), f32),
            jax.ShapeDtypeStruct((B, Hkv, splits, Rp), f32),
        ],
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="decode_attention",
    )(qr, pos, kc, vc)

    # --- merge the split partials (tiny: B*Hkv*splits*Rp*D floats) -----------
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp2((m - m_all) * c)  # [B,Hkv,splits,Rp]
    num = jnp.sum(acc * w[..., None], axis=2)  # [B,Hkv,Rp,Dp]
    den = jnp.sum(l * w, axis=2)
    out = num / jnp.where(den == 0.0, 1.0, den)[..., None]
    out = out[:, :, :R, :D].reshape(B, Hkv, Sq, G, D).transpose(0, 2, 1, 3, 4)
    return out.reshape(B, Sq, Hq, D).astype(q.dtype)

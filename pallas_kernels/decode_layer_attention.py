"""One decode step of one attention layer in one kernel.

RoPE of q and k, the KV-cache write and the attention of the new token.

For batch-1 decoding the per-layer XLA sequence after the fused q/k/v GEMV is
~8 tiny kernels (rope, k write, v write, QK^T, max, sum, convert, PV), each
latency bound.  This kernel does all of it:

  qkv [B, (Hq + 2 Hkv) * D]   un-roped q, k, v of ONE new token per row
                              (q heads, then k heads, then v heads)
  cos, sin [B, D]             rope factors of each row's position (HF
                              rotate-half: rope(x) = x cos + rotate_half(x) sin)
  pos int32 [B]               absolute position of the new token (= cache slot;
                              clamped into [0, T) so nothing is written OOB)
  k_cache, v_cache [B,T,Hkv,D] updated in place (``input_output_aliases``)
  -> out [B, Hq * D] (q's dtype), k_cache, v_cache

The query at position p sees slots j <= p (and j > p - W with a sliding
window W), the new token included.

Layout of the kernel:

* Grid (B, Hkv): one program per (row, kv head), handling the G = Hq / Hkv q
  heads that share the kv head (K/V are read once per group, never repeated).
* q and k are kept as two halves (x1 = x[:D/2], x2 = x[D/2:]): rope is then
  elementwise (r1 = x1 c1 - x2 s1, r2 = x2 c2 + x1 s2) and q.k = q1.k1 + q2.k2,
  so no concatenation / permutation is ever needed (the Triton lowering has no
  general concatenate).  The cache is read in the same two halves.
* The new token's roped k and its v are stored into slot ``pos``; the token's
  own contribution is taken from registers (a store followed by a load of the
  same global memory inside one program is not guaranteed to be visible across
  threads): the cache loop covers slots j < pos only, and the online softmax
  starts from (m, l, acc) = (q.k_new, 1, v_new).  Because m starts finite, a
  masked score (MASK_VALUE) always gives p == 0 exactly.
* Scores use ``dot`` on the tensor cores, which needs M >= 16 rows: with
  G < 16 the group's G query rows are repeated 16 / G times (identical rows,
  identical results); the duplicates are collapsed with a max at the end.
* The cache is never padded (it is updated in place): blocks of ``block_k``
  slots are loaded with a row mask (j < pos, and inside the window), so a
  block may run past T.  Blocks past ``pos`` or before the window are skipped.
* Softmax in fp32 and base 2 (p = exp2(s * c - m) with c = sm_scale log2 e).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._compat import block_spec, resolve_interpret, triton_params
from pallas_kernels.reference import decode_attention_reference

f32 = jnp.float32
MASK_VALUE = -1e30
LOG2E = math.log2(math.e)
MIN_ROWS = 16  # tensor-core dot tile: M, N, K >= 16


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def supported(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Shapes the kernel handles: G = Hq/Hkv and D powers of two, D >= 32."""
    return (
        num_heads % num_kv_heads == 0 and _is_pow2(num_heads // num_kv_heads) and _is_pow2(head_dim) and head_dim >= 32
    )


def _kernel(
    q_ref,
    kn_ref,
    vn_ref,
    cos_ref,
    sin_ref,
    pos_ref,
    kc_ref,
    vc_ref,
    o_ref,
    kc_out,
    vc_out,
    *,
    seq_k,
    hi_cap,
    block_k,
    window,
    c,
    rep,
    precision,
):
    G, D = q_ref.shape
    h = D // 2
    R = rep * G
    dt = q_ref.dtype
    cdt = kc_out.dtype

    pos = jnp.minimum(jnp.maximum(pos_ref[...], 0), seq_k - 1)

    cos1 = cos_ref[pl.ds(0, h)].astype(f32)
    cos2 = cos_ref[pl.ds(h, h)].astype(f32)
    sin1 = sin_ref[pl.ds(0, h)].astype(f32)
    sin2 = sin_ref[pl.ds(h, h)].astype(f32)

    def rope(x1, x2):
        x1, x2 = x1.astype(f32), x2.astype(f32)
        return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2

    # --- the new token: rope k, store k and v into slot pos --------------------
    k1, k2 = rope(kn_ref[pl.ds(0, h)], kn_ref[pl.ds(h, h)])
    k1, k2 = k1.astype(cdt), k2.astype(cdt)
    vn = vn_ref[...].astype(cdt)
    kc_out[pl.ds(pos, 1), pl.ds(0, h)] = k1[None, :]
    kc_out[pl.ds(pos, 1), pl.ds(h, h)] = k2[None, :]
    vc_out[pl.ds(pos, 1), :] = vn[None, :]

    # --- the group's queries, roped, rounded to the compute dtype -------------
    q1, q2 = rope(q_ref[:, pl.ds(0, h)], q_ref[:, pl.ds(h, h)])  # [G, h] f32
    q1, q2 = q1.astype(dt), q2.astype(dt)
    if rep > 1:  # repeat the G rows up to the dot's minimum of 16
        q1 = jnp.broadcast_to(q1[None], (rep, G, h)).reshape(R, h)
        q2 = jnp.broadcast_to(q2[None], (rep, G, h)).reshape(R, h)

    # The token's own score and value, exactly as a read-back of the cache.
    k1s, k2s = k1.astype(dt).astype(f32), k2.astype(dt).astype(f32)
    s_new = (jnp.sum(q1.astype(f32) * k1s[None, :], axis=1) + jnp.sum(q2.astype(f32) * k2s[None, :], axis=1)) * c  # [R]
    acc = jnp.broadcast_to(vn.astype(dt).astype(f32)[None, :], (R, D))
    m = s_new
    l = jnp.ones((R,), f32)

    # --- earlier slots: j < pos (and j > pos - window) ------------------------
    hi = lax.div(pos + (block_k - 1), block_k)
    if hi_cap is not None:
        hi = jnp.minimum(hi, hi_cap)
    if window is not None:
        first = jnp.maximum(pos - window + 1, 0)
        lo = lax.div(first, block_k)
    else:
        first = None
        lo = 0

    def body(kb, carry):
        acc, m, l = carry
        start = pl.multiple_of(kb * block_k, block_k)
        j = start + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        valid = j < pos
        if first is not None:
            valid = valid & (j >= first)
        mh = jnp.broadcast_to(valid[:, None], (block_k, h))
        md = jnp.broadcast_to(valid[:, None], (block_k, D))
        kb1 = plgpu.load(kc_ref.at[pl.ds(start, block_k), pl.ds(0, h)], mask=mh, other=0.0).astype(dt)
        kb2 = plgpu.load(kc_ref.at[pl.ds(start, block_k), pl.ds(h, h)], mask=mh, other=0.0).astype(dt)
        vb = plgpu.load(vc_ref.at[pl.ds(start, block_k), :], mask=md, other=0.0).astype(dt)
        nt = (((1,), (1,)), ((), ()))
        s = (
            lax.dot_general(q1, kb1, nt, precision=precision, preferred_element_type=f32)
            + lax.dot_general(q2, kb2, nt, precision=precision, preferred_element_type=f32)
        ) * c  # [R, bk]
        s = jnp.where(valid[None, :], s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])  # masked: exp2(-1e30 - finite) == 0
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + lax.dot_general(
            p.astype(dt), vb, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=f32
        )
        return acc, m_new, l

    acc, m, l = lax.fori_loop(lo, jnp.maximum(hi, lo), body, (acc, m, l))
    out = acc / l[:, None]  # l >= 1: the token itself
    if rep > 1:  # collapse the identical repeats
        out = jnp.max(out.reshape(rep, G, D), axis=0)
    o_ref[...] = out.astype(o_ref.dtype)


def _pick_block_k(T: int) -> int:
    for bk in (64, 32, 16):
        if T >= bk:
            return bk
    return 16


@functools.partial(
    jax.jit,
    static_argnames=(
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "sliding_window",
        "sm_scale",
        "kv_len",
        "interpret",
        "grouped",
        "block_k",
        "num_warps",
        "num_stages",
    ),
)
def decode_layer_attention(
    qkv,
    cos,
    sin,
    pos,
    k_cache,
    v_cache,
    *,
    num_heads,
    num_kv_heads,
    head_dim,
    sliding_window=None,
    sm_scale=None,
    kv_len=None,
    interpret=None,
    grouped=False,
    block_k=None,
    num_warps=4,
    num_stages=3,
):
    """RoPE + KV-cache write + attention of one new token per row.

    Returns (out [B, Hq * D] in qkv's dtype, k_cache, v_cache).  The caches are
    aliased to the outputs, so inside a jit whose caches are donated (or loop
    carried) the update is in place.  ``kv_len`` (static) optionally caps the
    slots read (every row's pos must be < kv_len).  ``grouped``: qkv is laid out
    per kv head, [Hkv, G + 2, D] (its G query heads, its k, its v: the model's
    joined q/k/v weights) instead of all q heads, then k, then v.  ``block_k``, ``num_warps``
    and ``num_stages`` are tuning knobs.
    """
    Hq, Hkv, D = num_heads, num_kv_heads, head_dim
    B = qkv.shape[0]
    _, T, _, _ = k_cache.shape
    if qkv.shape != (B, (Hq + 2 * Hkv) * D):
        raise ValueError(f"qkv {qkv.shape} != (B, (Hq + 2 Hkv) D) = ({B}, {(Hq + 2 * Hkv) * D})")
    if k_cache.shape != (B, T, Hkv, D) or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {k_cache.shape}/{v_cache.shape} != {(B, T, Hkv, D)}")
    if not supported(Hq, Hkv, D):
        raise ValueError(f"unsupported shape Hq={Hq} Hkv={Hkv} D={D}: need Hq/Hkv and D powers of two, D >= 32")
    if cos.shape != (B, D) or sin.shape != (B, D):
        raise ValueError(f"cos/sin {cos.shape}/{sin.shape} != {(B, D)}")
    G = Hq // Hkv
    rep = max(1, MIN_ROWS // G)
    interpret = resolve_interpret(interpret)
    c = float(D**-0.5 if sm_scale is None else sm_scale) * LOG2E
    bk = block_k or _pick_block_k(T)
    hi_cap = None if kv_len is None else -(-min(kv_len, T) // bk)
    precision = lax.Precision.HIGHEST if qkv.dtype == jnp.float32 else None

    if grouped:  # free: row-major split
        heads = qkv.reshape(B, Hkv, G + 2, D)
        q_spec = block_spec((None, None, G, D), lambda b, h: (b, h, 0, 0))
        k_spec = block_spec((None, None, None, D), lambda b, h: (b, h, G, 0))
        v_spec = block_spec((None, None, None, D), lambda b, h: (b, h, G + 1, 0))
    else:
        heads = qkv.reshape(B, Hq + 2 * Hkv, D)
        q_spec = block_spec((None, G, D), lambda b, h: (b, h, 0))
        k_spec = block_spec((None, None, D), lambda b, h: (b, Hq + h, 0))
        v_spec = block_spec((None, None, D), lambda b, h: (b, Hq + Hkv + h, 0))
    kernel = functools.partial(
        _kernel, seq_k=T, hi_cap=hi_cap, block_k=bk, window=sliding_window, c=c, rep=rep, precision=precision
    )
    cache_spec = block_spec((None, T, None, D), lambda b, h: (b, 0, h, 0))
    out, k_cache, v_cache = pl.pallas_call(
        kernel,
        grid=(B, Hkv),
        in_specs=[
            q_spec,
            k_spec,
            v_spec,
            block_spec((None, D), lambda b, h: (b, 0)),  # cos
            block_spec((None, D), lambda b, h: (b, 0)),  # sin
            block_spec((None,), lambda b, h: (b,)),  # pos
            cache_spec,
            cache_spec,
        ],
        out_specs=[
            block_spec((None, None, G, D), lambda b, h: (b, h, 0, 0)),
            cache_spec,
            cache_spec,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, Hkv, G, D), qkv.dtype),
            jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
            jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
        ],
        input_output_aliases={6: 1, 7: 2},
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="decode_layer_attention",
    )(heads, heads, heads, cos, sin, pos.astype(jnp.int32), k_cache, v_cache)
    return out.reshape(B, Hq * D), k_cache, v_cache


def decode_layer_attention_reference(
    qkv, cos, sin, pos, k_cache, v_cache, *, num_heads, num_kv_heads, head_dim, sliding_window=None, sm_scale=None
):
    """Pure jnp: rope q and k, write k/v at pos, attend over slots <= pos.

    Rounding follows the XLA decode path: roped q/k in the compute dtype, the
    cache holds k/v in its own dtype and is read back in the compute dtype; the
    attention itself is float32 (``decode_attention_reference``).
    """
    Hq, Hkv, D = num_heads, num_kv_heads, head_dim
    B = qkv.shape[0]
    T = k_cache.shape[1]
    dt = qkv.dtype
    q, k, v = jnp.split(qkv, [Hq * D, (Hq + Hkv) * D], axis=-1)
    q, k, v = q.reshape(B, Hq, D), k.reshape(B, Hkv, D), v.reshape(B, Hkv, D)
    cf, sf = cos.astype(f32)[:, None], sin.astype(f32)[:, None]

    def rope(x):
        x = x.astype(f32)
        rot = jnp.concatenate([-x[..., D // 2 :], x[..., : D // 2]], axis=-1)
        return (x * cf + rot * sf).astype(dt)

    q, k = rope(q), rope(k)
    pos = jnp.clip(pos.astype(jnp.int32), 0, T - 1)
    rows = jnp.arange(B)
    k_cache = k_cache.at[rows, pos].set(k.astype(k_cache.dtype))
    v_cache = v_cache.at[rows, pos].set(v.astype(v_cache.dtype))
    out = decode_attention_reference(
        q[:, None],
        k_cache.astype(dt),
        v_cache.astype(dt),
        pos[:, None],
        sliding_window=sliding_window,
        sm_scale=sm_scale,
    )
    return out.reshape(B, Hq * D).astype(dt), k_cache, v_cache

"""Flash attention (forward + backward) in Pallas, Triton lowering on GPU.

Layout is "BTNH" like ``jax.nn.dot_product_attention``:
q [B, S, Hq, D], k/v [B, T, Hkv, D], out [B, S, Hq, D] in q's dtype.

Design, top to bottom:

* Forward: one program per (q block, batch, q head).  It keeps a [block_q, D]
  fp32 accumulator plus the running max ``m`` and normaliser ``l`` (online
  softmax, FlashAttention-2) and walks over kv blocks.  It writes the output
  and the log-sum-exp (base 2, scaled units) that the backward needs.
* GQA/MQA: the kv BlockSpec's index_map picks kv head ``h // group``; K/V are
  never repeated in HBM.
* Masking: the kv loop is split into two ``fori_loop``s.  Blocks that are fully
  visible for every row of the q block run without any mask arithmetic; only
  the diagonal / window-edge / ragged-tail blocks (and every block when segment
  ids are given) build the mask.  Blocks that are fully masked (above the
  causal diagonal or left of the sliding window) are never visited.
* Ragged lengths: S and T are padded up to the block size in the wrapper; keys
  at positions >= T are masked inside the kernel, padded query rows are sliced
  off (their cotangent is zero, so they add nothing to dk/dv).
* Masked scores are set to a large *finite* negative value rather than -inf,
  so a row that sees nothing in a block never produces inf - inf = NaN.
* Backward (``jax.custom_vjp``): delta = rowsum(dO * O) is a cheap fused XLA
  reduction; then two kernels, dq (per q block, walks kv blocks) and dk/dv
  (per kv block and kv head, walks the q blocks of every q head in its group,
  so GQA gradients are summed in registers, not in HBM).  No S x T matrix is
  ever written to HBM.
* The softmax runs in base 2: p = exp2(s * c - m * c) with c = sm_scale *
  log2(e), which compiles to one FMA + ex2 per score.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._compat import block_spec, next_pow2, resolve_interpret, round_up, triton_params

f32 = jnp.float32
MASK_VALUE = -1e30  # finite: masked - masked = 0, never NaN
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static configuration of one attention call (hashable for custom_vjp)."""

    causal: bool
    window: int | None
    sm_scale: float
    seq_q: int  # true (unpadded) lengths
    seq_k: int
    group: int  # Hq // Hkv
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    warps_fwd: int
    stages_fwd: int
    warps_bwd: int
    stages_bwd: int
    interpret: bool


# ----------------------------------------------------------------------------
# Masks and block ranges
# ----------------------------------------------------------------------------
def _mask(q_pos, k_pos, cfg: _Cfg, seg_q=None, seg_k=None):
    """[bq, bk] visibility of keys k_pos for queries q_pos."""
    mask = (k_pos < cfg.seq_k)[None, :]
    if cfg.causal:
        mask = mask & (q_pos[:, None] >= k_pos[None, :])
    if cfg.window is not None:
        mask = mask & (k_pos[None, :] > q_pos[:, None] - cfg.window)
    if seg_q is not None:
        mask = mask & (seg_q[:, None] == seg_k[None, :])
    return mask


def _kv_ranges(qi, cfg: _Cfg, bq, bk, nk, has_seg):
    """For q block ``qi``: kv block ranges (lo, lo_full, hi_full, hi).

    [lo, hi) are all blocks with at least one visible key for some row;
    [lo_full, hi_full) is the sub-range that is visible for *every* row of the
    block and therefore needs no mask.  All arithmetic stays non-negative so
    ``lax.div`` is a floor division (``//`` on traced ints does not lower).
    """
    q_start = qi * bq
    q_last = q_start + (bq - 1)
    nk_full = cfg.seq_k // bk  # blocks with no padded keys
    hi = jnp.minimum(nk, lax.div(q_last, bk) + 1) if cfg.causal else nk
    if cfg.window is None:
        lo = 0
        lo_full = 0
    else:
        lo = lax.div(jnp.maximum(q_start - cfg.window + 1, 0), bk)
        lo_full = lax.div(jnp.maximum(q_last - cfg.window + 1, 0) + bk - 1, bk)
    if has_seg:
        return lo, hi, hi, hi  # every visited block needs the segment mask
    hi_full = jnp.minimum(nk_full, lax.div(q_start + 1, bk)) if cfg.causal else nk_full
    lo_full = jnp.minimum(jnp.maximum(lo_full, lo), hi)
    hi_full = jnp.maximum(jnp.minimum(hi_full, hi), lo_full)
    return lo, lo_full, hi_full, hi


def _q_ranges(ki, cfg: _Cfg, bq, bk, nq, has_seg):
    """For kv block ``ki``: q block ranges (lo, lo_full, hi_full, hi)."""
    k_start = ki * bk
    k_last = k_start + (bk - 1)
    # A traced int32 zero, not Python's 0: with a constant lower bound the Triton lowering of the
    # loops below met an i1 x i32 multiply (non-causal backward failed to compile).
    lo = lax.div(k_start, bq) if cfg.causal else k_start * 0
    if cfg.window is None:
        hi = nq
        hi_full = nq
    else:
        hi = jnp.minimum(nq, lax.div(k_last + cfg.window - 1, bq) + 1)
        hi_full = lax.div(k_start + cfg.window, bq)
    if has_seg:
        return lo, hi, hi, hi
    lo_full = lax.div(k_last + bq - 1, bq) if cfg.causal else lo
    lo_full = jnp.minimum(jnp.maximum(lo_full, lo), hi)
    hi_full = jnp.maximum(jnp.minimum(hi_full, hi), lo_full)
    # A kv block holding padded keys must be masked for every q block.
    kv_ok = k_last < cfg.seq_k
    lo_full = jnp.where(kv_ok, lo_full, hi)
    hi_full = jnp.where(kv_ok, hi_full, hi)
    return lo, lo_full, hi_full, hi


def _two_phase_loop(lo, lo_full, hi_full, hi, body, carry):
    """Run body(block, carry, masked) over [lo, hi): unmasked middle first."""
    carry = lax.fori_loop(lo_full, hi_full, lambda b, c: body(b, c, False), carry)
    n_left = lo_full - lo
    n_masked = n_left + (hi - hi_full)

    def masked_body(j, c):
        b = jnp.where(j < n_left, lo + j, hi_full + (j - n_left))
        return body(b, c, True)

    return lax.fori_loop(0, n_masked, masked_body, carry)


def _dot_nt(a, b):
    """a [m, k] @ b[n, k]^T -> [m, n] in fp32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=f32)


def _dot_tn(a, b):
    """a [k, m]^T @ b [k, n] -> [m, n] in fp32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=f32)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=f32)


# ----------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------
def _fwd_kernel(*refs, cfg: _Cfg, has_seg: bool, nq: int, nk: int):
    if has_seg:
        q_ref, k_ref, v_ref, sq_ref, sk_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    bq, bk = cfg.block_q, cfg.block_k
    # Heaviest causal q blocks (the last ones) are launched first: better tail.
    qi = (nq - 1 - pl.program_id(0)) if cfg.causal else pl.program_id(0)
    c = cfg.sm_scale * LOG2E

    q = q_ref[...]
    q_pos = qi * bq + jnp.arange(bq)
    seg_q = sq_ref[...] if has_seg else None

    def body(kb, carry, masked):
        acc, m, l = carry
        start = pl.multiple_of(kb * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = _dot_nt(q, k)  # [bq, bk] raw scores, fp32
        if masked:
            seg_k = sk_ref[pl.ds(start, bk)] if has_seg else None
            s = jnp.where(_mask(q_pos, start + jnp.arange(bk), cfg, seg_q, seg_k), s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2((m - m_new) * c)
        # A row that has seen no visible key yet has m_new == MASK_VALUE.  The
        # compilers contract s*c - m*c into one FMA, whose exact product minus the
        # rounded m*c leaves a residual of ~1e22 that exp2 turns into inf (then
        # NaN).  Offsetting such rows by 0 makes their masked p exactly 0 instead.
        m_off = jnp.where(m_new == MASK_VALUE, 0.0, m_new * c)
        p = jnp.exp2(s * c - m_off[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    D = q.shape[-1]
    carry = (jnp.zeros((bq, D), f32), jnp.full((bq,), MASK_VALUE, f32), jnp.zeros((bq,), f32))
    lo, lo_full, hi_full, hi = _kv_ranges(qi, cfg, bq, bk, nk, has_seg)
    acc, m, l = _two_phase_loop(lo, lo_full, hi_full, hi, body, carry)
    no_key = l == 0.0  # only possible for padded rows
    l = jnp.where(no_key, 1.0, l)
    o_ref[...] = (acc * (1.0 / l)[:, None]).astype(o_ref.dtype)
    # A huge *positive* lse makes the backward's p = exp2(s*c - lse) exactly 0
    # on such rows, whatever FMA contraction does to s*c.
    lse_ref[...] = jnp.where(no_key, -MASK_VALUE, m * c + jnp.log2(l))


def _fwd_call(q, k, v, seg, cfg: _Cfg):
    B, Sp, Hq, D = q.shape
    Tp = k.shape[1]
    bq, bk, G = cfg.block_q, cfg.block_k, cfg.group
    nq, nk = Sp // bq, Tp // bk
    has_seg = seg is not None
    in_specs = [
        block_spec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),
        block_spec((None, Tp, None, D), lambda i, b, h: (b, 0, h // G, 0)),
        block_spec((None, Tp, None, D), lambda i, b, h: (b, 0, h // G, 0)),
    ]
    args = [q, k, v]
    if has_seg:
        in_specs += [block_spec((None, bq), lambda i, b, h: (b, i)), block_spec((None, Tp), lambda i, b, h: (b, 0))]
        args += [seg, seg]
    if cfg.causal:
        # The kernel reverses the q-block order; the BlockSpecs must agree.
        rev = lambda f: lambda i, b, h: f(nq - 1 - i, b, h)
        in_specs[0] = block_spec((None, bq, None, D), rev(lambda i, b, h: (b, i, h, 0)))
        if has_seg:
            in_specs[3] = block_spec((None, bq), rev(lambda i, b, h: (b, i)))
        o_map = rev(lambda i, b, h: (b, i, h, 0))
        lse_map = rev(lambda i, b, h: (b, h, i))
    else:
        o_map = lambda i, b, h: (b, i, h, 0)
        lse_map = lambda i, b, h: (b, h, i)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, has_seg=has_seg, nq=nq, nk=nk),
        grid=(nq, B, Hq),
        in_specs=in_specs,
        out_specs=[block_spec((None, bq, None, D), o_map), block_spec((None, None, bq), lse_map)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, Hq, Sp), f32)],
        compiler_params=triton_params(cfg.warps_fwd, cfg.stages_fwd),
        interpret=cfg.interpret,
        name="flash_fwd",
    )(*args)


# ----------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------
def _dq_kernel(*refs, cfg: _Cfg, has_seg: bool, nq: int, nk: int):
    if has_seg:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, sq_ref, sk_ref, dq_ref) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    qi = pl.program_id(0)
    c = cfg.sm_scale * LOG2E
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = qi * bq + jnp.arange(bq)
    seg_q = sq_ref[...] if has_seg else None

    def body(kb, dq, masked):
        start = pl.multiple_of(kb * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = _dot_nt(q, k)
        if masked:
            seg_k = sk_ref[pl.ds(start, bk)] if has_seg else None
            s = jnp.where(_mask(q_pos, start + jnp.arange(bk), cfg, seg_q, seg_k), s, MASK_VALUE)
        p = jnp.exp2(s * c - lse[:, None])
        dp = _dot_nt(do, v)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    lo, lo_full, hi_full, hi = _kv_ranges(qi, cfg, bq, bk, nk, has_seg)
    dq = _two_phase_loop(lo, lo_full, hi_full, hi, body, jnp.zeros(q.shape, f32))
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, cfg: _Cfg, has_seg: bool, nq: int, nk: int):
    if has_seg:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, sq_ref, sk_ref, dk_ref, dv_ref) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
    ki = pl.program_id(0)
    c = cfg.sm_scale * LOG2E
    k = k_ref[...]
    v = v_ref[...]
    k_pos = ki * bk + jnp.arange(bk)
    seg_k = sk_ref[...] if has_seg else None
    lo, lo_full, hi_full, hi = _q_ranges(ki, cfg, bq, bk, nq, has_seg)

    def group_body(g, carry):
        # q_ref/do_ref hold the whole group of q heads sharing this kv head.
        def body(qb, carry, masked):
            dk, dv = carry
            start = pl.multiple_of(qb * bq, bq)
            q = q_ref[pl.ds(start, bq), g, :]
            do = do_ref[pl.ds(start, bq), g, :]
            lse = lse_ref[g, pl.ds(start, bq)]
            delta = delta_ref[g, pl.ds(start, bq)]
            s = _dot_nt(q, k)  # [bq, bk]
            if masked:
                seg_q = sq_ref[pl.ds(start, bq)] if has_seg else None
                s = jnp.where(_mask(start + jnp.arange(bq), k_pos, cfg, seg_q, seg_k), s, MASK_VALUE)
            p = jnp.exp2(s * c - lse[:, None])
            dv = dv + _dot_tn(p.astype(do.dtype), do)
            dp = _dot_nt(do, v)
            ds = p * (dp - delta[:, None])
            dk = dk + _dot_tn(ds.astype(q.dtype), q)
            return dk, dv

        return _two_phase_loop(lo, lo_full, hi_full, hi, body, carry)

    D = k.shape[-1]
    zeros = jnp.zeros((bk, D), f32)
    dk, dv = lax.fori_loop(0, cfg.group, group_body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_call(q, k, v, seg, o, lse, do, cfg: _Cfg):
    B, Sp, Hq, D = q.shape
    Tp, Hkv = k.shape[1], k.shape[2]
    bq, bk, G = cfg.block_q_bwd, cfg.block_k_bwd, cfg.group
    nq, nk = Sp // bq, Tp // bk
    has_seg = seg is not None
    # delta_i = sum_d dO_id * O_id: one fused elementwise+reduce pass in XLA.
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(f32), do.astype(f32))
    params = triton_params(cfg.warps_bwd, cfg.stages_bwd)

    # dq: one program per (q block, batch, q head).
    in_specs = [
        block_spec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),
        block_spec((None, Tp, None, D), lambda i, b, h: (b, 0, h // G, 0)),
        block_spec((None, Tp, None, D), lambda i, b, h: (b, 0, h // G, 0)),
        block_spec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),
        block_spec((None, None, bq), lambda i, b, h: (b, h, i)),
        block_spec((None, None, bq), lambda i, b, h: (b, h, i)),
    ]
    args = [q, k, v, do, lse, delta]
    if has_seg:
        in_specs += [block_spec((None, bq), lambda i, b, h: (b, i)), block_spec((None, Tp), lambda i, b, h: (b, 0))]
        args += [seg, seg]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, has_seg=has_seg, nq=nq, nk=nk),
        grid=(nq, B, Hq),
        in_specs=in_specs,
        out_specs=block_spec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=cfg.interpret,
        name="flash_bwd_dq",
    )(*args)

    # dk/dv: one program per (kv block, batch, kv head); loops over its group.
    in_specs = [
        block_spec((None, Sp, G, D), lambda i, b, h: (b, 0, h, 0)),
        block_spec((None, bk, None, D), lambda i, b, h: (b, i, h, 0)),
        block_spec((None, bk, None, D), lambda i, b, h: (b, i, h, 0)),
        block_spec((None, Sp, G, D), lambda i, b, h: (b, 0, h, 0)),
        block_spec((None, G, Sp), lambda i, b, h: (b, h, 0)),
        block_spec((None, G, Sp), lambda i, b, h: (b, h, 0)),
    ]
    args = [q, k, v, do, lse, delta]
    if has_seg:
        in_specs += [block_spec((None, Sp), lambda i, b, h: (b, 0)), block_spec((None, bk), lambda i, b, h: (b, i))]
        args += [seg, seg]
    kv_spec = block_spec((None, bk, None, D), lambda i, b, h: (b, i, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, has_seg=has_seg, nq=nq, nk=nk),
        grid=(nk, B, Hkv),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=cfg.interpret,
        name="flash_bwd_dkdv",
    )(*args)
    return dq, dk, dv


# ----------------------------------------------------------------------------
# custom_vjp glue
# ----------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, cfg):
    return _fwd_call(q, k, v, seg, cfg)[0]


def _flash_fwd(q, k, v, seg, cfg):
    o, lse = _fwd_call(q, k, v, seg, cfg)
    return o, (q, k, v, seg, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, seg, o, lse = res
    dq, dk, dv = _bwd_call(q, k, v, seg, o, lse, do, cfg)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def _default_blocks(D):
    """Tuned on H100 bf16 (see benchmarks/KERNEL_NOTES.md)."""
    # (block_q, block_k, num_warps, num_stages).  D=128 values are the winners
    # of the sweep at S=4096 (fwd 408 TF/s, fwd+bwd 338 TF/s); D=64 reuses them.
    if D <= 128:
        fwd = (128, 64, 4, 2)
        bwd = (64, 64, 4, 2)
    else:
        fwd = (64, 32, 4, 2)
        bwd = (32, 32, 4, 1)
    return fwd, bwd


@functools.partial(
    jax.jit,
    static_argnames=(
        "causal",
        "sliding_window",
        "sm_scale",
        "block_q",
        "block_k",
        "interpret",
        "block_q_bwd",
        "block_k_bwd",
        "num_warps",
        "num_stages",
        "num_warps_bwd",
        "num_stages_bwd",
        "backend",
    ),
)
def flash_attention(
    q,
    k,
    v,
    *,
    causal=True,
    sliding_window=None,
    segment_ids=None,
    sm_scale=None,
    block_q=None,
    block_k=None,
    interpret=None,
    block_q_bwd=None,
    block_k_bwd=None,
    num_warps=None,
    num_stages=None,
    num_warps_bwd=None,
    num_stages_bwd=None,
    backend="auto",
):
    """Fused attention.  q [B,S,Hq,D], k/v [B,T,Hkv,D] -> [B,S,Hq,D].

    causal: query i sees keys j <= i (top-left aligned when S != T).
    sliding_window=W: query i sees keys i - W < j <= i (implies causal).
    segment_ids: int32 [B, S] (requires S == T); attend within equal ids.
    sm_scale: defaults to 1/sqrt(D).
    backend: "auto" runs the Mosaic GPU kernel (flash_attention_mgpu.py) on a
    Hopper GPU when the call fits it, else this file's kernel; "triton" always
    takes this file's kernel (interpreted off-GPU); "mosaic" insists.
    The extra keyword arguments after ``interpret`` are tuning knobs of the
    Triton kernel.
    """
    B, S, Hq, D = q.shape
    Bk, T, Hkv, Dk = k.shape
    if v.shape != k.shape or Bk != B or Dk != D:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}")
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    if segment_ids is not None and (S != T or segment_ids.shape != (B, S)):
        raise ValueError("segment_ids must be [B, S] with S == T")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError("sliding_window must be >= 1")
    if backend not in ("auto", "triton", "mosaic"):
        raise ValueError(f"backend must be auto, triton or mosaic, got {backend!r}")
    interpret = resolve_interpret(interpret)
    sm_scale = float(D**-0.5 if sm_scale is None else sm_scale)
    k = k.astype(q.dtype)
    v = v.astype(q.dtype)
    if backend != "triton":
        from pallas_kernels import flash_attention_mgpu as mgpu

        fits = (
            not interpret
            and mgpu.available()
            and mgpu.supported(q, k, v, sliding_window=sliding_window, segment_ids=segment_ids)
        )
        if fits:
            return mgpu.mgpu_flash_attention(q, k, v, causal=causal, sm_scale=sm_scale)
        if backend == "mosaic":
            raise ValueError(
                "backend='mosaic' needs a Hopper GPU and a call that flash_attention_mgpu.supported() accepts"
            )

    (dbq, dbk, dw, dst), (dbqb, dbkb, dwb, dstb) = _default_blocks(D)
    # Never use blocks (much) larger than the sequence; keep powers of two >= 16
    # (tensor-core dot minimum in the Triton lowering).
    cap_q = max(16, next_pow2(S))
    cap_k = max(16, next_pow2(T))
    bq = min(block_q or dbq, cap_q)
    bk = min(block_k or dbk, cap_k)
    bqb = min(block_q_bwd or dbqb, cap_q)
    bkb = min(block_k_bwd or dbkb, cap_k)

    # Pad D to a power of two (>= 16) and S/T to a multiple of every block size
    # used by forward and backward, so all BlockSpecs tile exactly.
    Dp = max(16, next_pow2(D))
    mult = max(bq, bk, bqb, bkb)
    Sp, Tp = round_up(S, mult), round_up(T, mult)
    if segment_ids is not None:
        Sp = Tp = max(Sp, Tp)

    def pad(x, n):
        if x.shape[1] == n and x.shape[3] == Dp:
            return x
        return jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, Dp - D)))

    seg = None
    if segment_ids is not None:
        seg = segment_ids.astype(jnp.int32)
        if Sp != S:
            # Padded positions get their own id; they are masked as keys anyway.
            seg = jnp.pad(seg, ((0, 0), (0, Sp - S)), constant_values=-1)

    cfg = _Cfg(
        causal=bool(causal or sliding_window is not None),
        window=None if sliding_window is None else int(sliding_window),
        sm_scale=sm_scale,
        seq_q=S,
        seq_k=T,
        group=Hq // Hkv,
        block_q=bq,
        block_k=bk,
        block_q_bwd=bqb,
        block_k_bwd=bkb,
        warps_fwd=num_warps or dw,
        stages_fwd=num_stages or dst,
        warps_bwd=num_warps_bwd or dwb,
        stages_bwd=num_stages_bwd or dstb,
        interpret=interpret,
    )
    out = _flash(pad(q, Sp), pad(k, Tp), pad(v, Tp), seg, cfg)
    return out[:, :S, :, :D]

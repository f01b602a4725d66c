"""Tiled matmuls in Pallas (Triton lowering on GPU).

* ``matmul(a, b)``: bf16/fp16 (or fp32) operands, fp32 accumulation, output in
  a's dtype (or ``out_dtype``).
* ``int8_matmul(x, w_int8, scales)``: weight-only int8, x [M, K] bf16,
  w [K, N] int8, per-output-channel scales [N] -> x @ (w * scales).  The int8
  tile is widened to x's dtype in registers (exact for |w| <= 127) and the
  scale is applied once to the fp32 accumulator at the end, so HBM traffic on
  the weights is halved relative to bf16 - which is all that matters for the
  skinny decode shapes, where the kernel is weight-bandwidth bound.

One program computes one [block_m, block_n] output tile and walks K in
block_k steps; Triton software-pipelines the loop (``num_stages``) and emits
wgmma on Hopper.  Programs are numbered in "grouped" order (``group_m`` rows
of tiles at a time) so that concurrently running programs share A and B tiles
in L2 instead of streaming the whole of B once per row of tiles.

On a non-GPU backend, unless ``interpret=True`` is passed, ``matmul`` and
``int8_matmul`` fall back to XLA (``jnp.dot`` with fp32 accumulation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._compat import block_spec, on_gpu, round_up, triton_params

f32 = jnp.float32


def _grouped_ids(pid, nm, nn, group_m):
    """Map a linear program id to (tile_m, tile_n) in L2-friendly order.

    Uses lax.div/lax.rem (all operands non-negative): Python ``//``/``%`` on
    traced ints lower to sign fix-ups the Triton lowering does not need.
    """
    width = group_m * nn
    group = lax.div(pid, width)
    first_m = group * group_m
    size_m = jnp.minimum(nm - first_m, group_m)
    in_group = lax.rem(pid, width)
    return first_m + lax.rem(in_group, size_m), lax.div(in_group, size_m)


def _mm_kernel(a_ref, b_ref, *rest, block_k, nk, has_scale):
    if has_scale:
        s_ref, o_ref = rest
    else:
        (o_ref,) = rest
    bm, bn = o_ref.shape

    def body(kb, acc):
        start = pl.multiple_of(kb * block_k, block_k)
        a = a_ref[:, pl.ds(start, block_k)]
        b = b_ref[pl.ds(start, block_k), :]
        if b.dtype != a.dtype:
            b = b.astype(a.dtype)  # int8 -> bf16, exact
        return acc + lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=f32)

    acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), f32))
    if has_scale:
        acc = acc * s_ref[...][None, :]
    o_ref[...] = acc.astype(o_ref.dtype)


def _default_config(M, N, K, int8):
    """(block_m, block_n, block_k, num_warps, num_stages); H100-tuned."""
    if M <= 16:
        # Weight-bandwidth bound; sweep at 16x8192x8192: bf16 58 us (2.3 TB/s),
        # int8 48 us (1.4 TB/s of int8 weight).
        return (16, 64, 128, 4, 4) if int8 else (16, 64, 256, 4, 4)
    if M <= 64:
        return (64, 64, 128, 4, 4)
    return (128, 256, 64, 8, 3)


def _pallas_matmul(a, b, scales, *, out_dtype, block_m, block_n, block_k, num_warps, num_stages, group_m, interpret):
    M, K = a.shape
    _, N = b.shape
    dbm, dbn, dbk, dw, dst = _default_config(M, N, K, b.dtype == jnp.int8)
    # Clamp blocks to the (padded) problem; 16 is the tensor-core minimum.
    bm = min(block_m or dbm, max(16, round_up(M, 16)))
    bn = min(block_n or dbn, max(16, round_up(N, 16)))
    bk = min(block_k or dbk, max(16, round_up(K, 16)))
    Mp, Np, Kp = round_up(M, bm), round_up(N, bn), round_up(K, bk)
    # Zero padding along K is exact; padded M rows / N columns are sliced off.
    if (Mp, Kp) != (M, K):
        a = jnp.pad(a, ((0, Mp - M), (0, Kp - K)))
    if (Kp, Np) != (K, N):
        b = jnp.pad(b, ((0, Kp - K), (0, Np - N)))
    nm, nn, nk = Mp // bm, Np // bn, Kp // bk
    ids = lambda pid: _grouped_ids(pid, nm, nn, group_m)
    in_specs = [block_spec((bm, Kp), lambda pid: (ids(pid)[0], 0)), block_spec((Kp, bn), lambda pid: (0, ids(pid)[1]))]
    args = [a, b]
    if scales is not None:
        s = scales.astype(f32)
        if Np != N:
            s = jnp.pad(s, (0, Np - N))
        in_specs.append(block_spec((bn,), lambda pid: (ids(pid)[1],)))
        args.append(s)
    out = pl.pallas_call(
        functools.partial(_mm_kernel, block_k=bk, nk=nk, has_scale=scales is not None),
        grid=(nm * nn,),
        in_specs=in_specs,
        out_specs=block_spec((bm, bn), ids),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        compiler_params=triton_params(num_warps or dw, num_stages or dst),
        interpret=interpret,
        name="int8_matmul" if scales is not None else "matmul",
    )(*args)
    return out[:M, :N] if (Mp, Np) != (M, N) else out


_STATIC = ("block_m", "block_n", "block_k", "interpret", "out_dtype", "num_warps", "num_stages", "group_m")


@functools.partial(jax.jit, static_argnames=_STATIC)
def matmul(
    a,
    b,
    *,
    block_m=None,
    block_n=None,
    block_k=None,
    interpret=None,
    out_dtype=None,
    num_warps=None,
    num_stages=None,
    group_m=8,
):
    """a [M, K] @ b [K, N] with fp32 accumulation -> [M, N] in a's dtype."""
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"bad shapes {a.shape} @ {b.shape}")
    if not on_gpu() and not interpret:
        return jnp.dot(a, b.astype(a.dtype), preferred_element_type=f32).astype(out_dtype)
    return _pallas_matmul(
        a,
        b.astype(a.dtype),
        None,
        out_dtype=out_dtype,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
        group_m=group_m,
        interpret=not on_gpu(),
    )


@functools.partial(jax.jit, static_argnames=_STATIC)
def int8_matmul(
    x,
    w_int8,
    scales,
    *,
    block_m=None,
    block_n=None,
    block_k=None,
    interpret=None,
    out_dtype=None,
    num_warps=None,
    num_stages=None,
    group_m=8,
):
    """Weight-only int8: x [M, K] @ (w_int8 [K, N] * scales [N]) -> [M, N]."""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if w_int8.dtype != jnp.int8:
        raise ValueError(f"w_int8 must be int8, got {w_int8.dtype}")
    if x.shape[1] != w_int8.shape[0] or scales.shape != (w_int8.shape[1],):
        raise ValueError(f"bad shapes {x.shape}, {w_int8.shape}, {scales.shape}")
    if not on_gpu() and not interpret:
        acc = jnp.dot(x, w_int8.astype(x.dtype), preferred_element_type=f32)
        return (acc * scales.astype(f32)[None, :]).astype(out_dtype)
    return _pallas_matmul(
        x,
        w_int8,
        scales,
        out_dtype=out_dtype,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
        group_m=group_m,
        interpret=not on_gpu(),
    )

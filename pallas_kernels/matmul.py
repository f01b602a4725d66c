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

Any M, K, N: the Triton lowering only takes power-of-two tiles, so every block
is a power of two (at least 16, the tensor-core minimum) and the operands are
zero-padded up to whole blocks (exact along K; padded rows/columns are sliced
off).  Blocks are picked to divide K and N where a power of two does, so a
model's weights (multiples of 64 or 128) are never copied; only odd dims pay
for a padded copy.

A single row (batch-1 decode) skips tl.dot and its 16-row minimum: the kernel multiplies the weight
tile by the broadcast activation column and sums (a GEMV on the CUDA cores, bandwidth bound anyway).

Split-K: a skinny (decode) product has few output tiles - a [1, 2048] x
[2048, 2048] GEMV is 32 tiles of 64 columns on a 132-SM GPU - so the K loop is
split over ``splits`` programs per tile that write fp32 partial tiles, summed
afterwards (a [splits, M, N] reduction that XLA fuses into what follows).

On a non-GPU backend, unless ``interpret=True`` is passed, ``matmul`` and
``int8_matmul`` fall back to XLA (``jnp.dot`` with fp32 accumulation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._compat import block_spec, next_pow2, resolve_interpret, round_up, triton_params

f32 = jnp.float32
MIN_BLOCK = 16  # tl.dot's smallest tile side
TARGET_PROGRAMS = 264  # ~2 waves on an H100/H200 (132 SMs): what split-K aims for


def use_xla(interpret) -> bool:
    """Off GPU the compiled path cannot run: XLA computes the product unless interpret=True asks for the
    kernel in interpret mode (tests). Goes through `resolve_interpret` so tests/triton_lowering.py can
    force the compiled path."""
    return resolve_interpret(interpret) and interpret is not True


def int8_matmul_xla(x, w_int8, scales):
    """XLA's form of `int8_matmul` (fp32 result): convert, dot, scale."""
    acc = jnp.dot(x, w_int8.astype(x.dtype), preferred_element_type=f32)
    return acc * scales.astype(f32)[None, :]


def pick_block(dim: int, default: int) -> int:
    """A power-of-two block for a dimension of size `dim`: the largest one <= `default` that divides
    `dim` (no padding) if that is at least MIN_BLOCK, else `default` clamped to the padded dim."""
    b = default
    while b >= MIN_BLOCK:
        if dim % b == 0:
            return b
        b //= 2
    return min(default, max(MIN_BLOCK, next_pow2(dim)))


def pick_splits(tiles: int, k_steps: int, splits: int | None) -> int:
    """Split-K factor: a divisor of `k_steps`, the smallest that brings tiles x splits to TARGET_PROGRAMS."""
    if splits is not None:
        if k_steps % splits:
            raise ValueError(f"splits={splits} must divide the {k_steps} K steps")
        return splits
    want = -(-TARGET_PROGRAMS // tiles)
    return min([d for d in range(1, k_steps + 1) if k_steps % d == 0 and d >= want] or [k_steps])


def grouped_ids(pid, nm, nn, group_m):
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


def pad2(a, rows: int, cols: int):
    """Zero-pad a 2-D array up to [rows, cols] (no copy when it already is)."""
    r, c = a.shape
    return a if (r, c) == (rows, cols) else jnp.pad(a, ((0, rows - r), (0, cols - c)))


def _mm_kernel(a_ref, b_ref, *rest, block_k, steps, has_scale, gemv):
    """gemv (M == 1): a arrives as a column [K, 1] and each step is a broadcast-multiply-sum on the
    CUDA cores (no padding of a to tl.dot's 16 rows); otherwise a [bm, K] tile and tl.dot."""
    if has_scale:
        s_ref, o_ref = rest
    else:
        (o_ref,) = rest
    bm, bn = o_ref.shape
    first = pl.program_id(1) * steps

    def body(kb, acc):
        start = pl.multiple_of((first + kb) * block_k, block_k)
        b = b_ref[pl.ds(start, block_k), :]
        if gemv:
            a = a_ref[pl.ds(start, block_k), :].astype(f32)
            return acc + jnp.sum(a * b.astype(f32), axis=0, keepdims=True)
        a = a_ref[:, pl.ds(start, block_k)]
        if b.dtype != a.dtype:
            b = b.astype(a.dtype)  # int8 -> bf16, exact
        return acc + lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=f32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), f32))
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


def _pallas_matmul(
    a, b, scales, *, out_dtype, block_m, block_n, block_k, num_warps, num_stages, group_m, splits, interpret
):
    M, K = a.shape
    _, N = b.shape
    dbm, dbn, dbk, dw, dst = _default_config(M, N, K, b.dtype == jnp.int8)
    gemv = M == 1
    bm = 1 if gemv else min(block_m or dbm, max(MIN_BLOCK, next_pow2(M)))
    bn, bk = pick_block(N, block_n or dbn), pick_block(K, block_k or dbk)
    Mp, Np, Kp = round_up(M, bm), round_up(N, bn), round_up(K, bk)
    a, b = pad2(a, Mp, Kp), pad2(b, Kp, Np)
    nm, nn, nk = Mp // bm, Np // bn, Kp // bk
    ks = pick_splits(nm * nn, nk, splits) if M <= 64 else (splits or 1)
    ids = lambda pid, s: grouped_ids(pid, nm, nn, group_m)
    a_spec = block_spec((bm, Kp), lambda pid, s: (ids(pid, s)[0], 0))
    if gemv:
        a, a_spec = a.reshape(Kp, 1), block_spec((Kp, 1), lambda pid, s: (0, 0))
    in_specs = [a_spec, block_spec((Kp, bn), lambda pid, s: (0, ids(pid, s)[1]))]
    args = [a, b]
    if scales is not None:
        s = scales.astype(f32)
        if Np != N:
            s = jnp.pad(s, (0, Np - N))
        in_specs.append(block_spec((bn,), lambda pid, s: (ids(pid, s)[1],)))
        args.append(s)
    # Split-K programs write their fp32 partial tiles side by side: [Mp, ks * Np], summed below.
    out = pl.pallas_call(
        functools.partial(_mm_kernel, block_k=bk, steps=nk // ks, has_scale=scales is not None, gemv=gemv),
        grid=(nm * nn, ks),
        in_specs=in_specs,
        out_specs=block_spec((bm, bn), lambda pid, s: (ids(pid, s)[0], s * nn + ids(pid, s)[1])),
        out_shape=jax.ShapeDtypeStruct((Mp, ks * Np), out_dtype if ks == 1 else f32),
        compiler_params=triton_params(num_warps or dw, num_stages or dst),
        interpret=interpret,
        name="int8_matmul" if scales is not None else "matmul",
    )(*args)
    if ks > 1:
        out = out.reshape(Mp, ks, Np).sum(axis=1).astype(out_dtype)
    return out[:M, :N]


_STATIC = ("block_m", "block_n", "block_k", "interpret", "out_dtype", "num_warps", "num_stages", "group_m", "splits")


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
    splits=None,
):
    """a [M, K] @ b [K, N] with fp32 accumulation -> [M, N] in a's dtype."""
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"bad shapes {a.shape} @ {b.shape}")
    if use_xla(interpret):
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
        splits=splits,
        interpret=resolve_interpret(interpret),
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
    splits=None,
):
    """Weight-only int8: x [M, K] @ (w_int8 [K, N] * scales [N]) -> [M, N]."""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if w_int8.dtype != jnp.int8:
        raise ValueError(f"w_int8 must be int8, got {w_int8.dtype}")
    if x.shape[1] != w_int8.shape[0] or scales.shape != (w_int8.shape[1],):
        raise ValueError(f"bad shapes {x.shape}, {w_int8.shape}, {scales.shape}")
    if use_xla(interpret):
        return int8_matmul_xla(x, w_int8, scales).astype(out_dtype)
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
        splits=splits,
        interpret=resolve_interpret(interpret),
    )

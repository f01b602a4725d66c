"""Group-wise int4 weight-only matmul in Pallas (Triton lowering on GPU).

``int4_matmul(x, packed, scales, offsets, group_size=G)``: x [M, K] (bf16/fp16/fp32) times a weight
stored as 4-bit codes q in 0..15 with one scale and one offset per group of G input rows per output
column, w[k, n] = q[k, n] * scales[k // G, n] + offsets[k // G, n], -> [M, N] in x's dtype.

Packing (`pack_int4`): two codes a byte, [K // 2, N] uint8. Within each group of G rows, byte row j
holds row j in its low nibble and row j + G/2 in its high nibble. The kernel then never interleaves
anything: a group is two plain dots, x[:, first half] @ low nibbles + x[:, second half] @ high nibbles.

The weight is dequantized in registers, never in HBM, and only as far as needed: the codes (0..15,
exact in bf16) go into the dot as they are, and the group's scale and offset are applied to the fp32
[block_m, block_n] partial product,

    sum_k x[m, k] w[k, n] = sum_g ( s[g, n] * (x_g @ q_g)[m, n] + o[g, n] * sum_{k in g} x[m, k] ),

so per group the kernel converts G x block_n codes and does 2 x block_m x block_n multiply-adds instead
of dequantizing G x block_n weights (the group's row sums of x come from the x tile in registers).
A single row (batch-1 decode) skips tl.dot and its 16-row minimum: broadcast-multiply-sum instead.

One program walks whole groups of one [block_m, block_n] output tile; tiles, padding (any M and N;
K up to a whole group, which `pack_int4`'s caller pads with zero rows) and split-K for skinny decode
products work as in pallas_kernels/matmul.py. Off GPU, unless interpret=True, XLA computes the same
product from the dequantized weight (`int4_matmul_xla`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._compat import block_spec, next_pow2, resolve_interpret, round_up, triton_params
from pallas_kernels.matmul import MIN_BLOCK, grouped_ids, pad2, pick_block, pick_splits

f32 = jnp.float32


def check_group_size(group_size: int) -> None:
    if group_size < 2 * MIN_BLOCK or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= {2 * MIN_BLOCK}, got {group_size}")


def pack_int4(q, group_size: int):
    """Codes [..., K, N] (uint8 in 0..15, K a multiple of group_size) -> [..., K // 2, N] uint8 (layout above)."""
    *lead, K, N = q.shape
    q = q.astype(jnp.uint8).reshape(*lead, K // group_size, 2, group_size // 2, N)
    return (q[..., 0, :, :] | (q[..., 1, :, :] << 4)).reshape(*lead, K // 2, N)


def unpack_int4(packed, group_size: int):
    """Inverse of `pack_int4`: [..., K // 2, N] uint8 -> codes [..., K, N] uint8."""
    *lead, K2, N = packed.shape
    p = packed.reshape(*lead, K2 // (group_size // 2), 1, group_size // 2, N)
    return jnp.concatenate([p & 15, p >> 4], axis=-3).reshape(*lead, 2 * K2, N)


def dequantize_int4(packed, scales, offsets, group_size: int, dtype=f32):
    """The [..., K, N] weight in `dtype` (the XLA path and tests)."""
    q = unpack_int4(packed, group_size).astype(f32)
    *lead, K, N = q.shape
    q = q.reshape(*lead, K // group_size, group_size, N)
    w = q * scales.astype(f32)[..., None, :] + offsets.astype(f32)[..., None, :]
    return w.reshape(*lead, K, N).astype(dtype)


def int4_matmul_xla(x, packed, scales, offsets, group_size: int):
    """XLA's form of `int4_matmul` (fp32 result): dequantize to x's dtype, then one dot."""
    w = dequantize_int4(packed, scales, offsets, group_size, x.dtype)
    return jnp.dot(x, w, preferred_element_type=f32)


def _int4_kernel(x_ref, w_ref, s_ref, o_ref, out_ref, *, group_size, steps, gemv):
    """gemv (M == 1): x arrives as a column [K, 1] and each group is two broadcast-multiply-sums on
    the CUDA cores (no padding of x to tl.dot's 16 rows); otherwise x [bm, K] and two dots."""
    bm, bn = out_ref.shape
    h = group_size // 2
    first = pl.program_id(1) * steps

    def body(i, acc):
        g = first + i
        k0 = pl.multiple_of(g * group_size, group_size)
        p = w_ref[pl.ds(pl.multiple_of(g * h, h), h), :]
        if gemv:
            xl = x_ref[pl.ds(k0, h), :].astype(f32)  # [h, 1]
            xh = x_ref[pl.ds(k0 + h, h), :].astype(f32)
            part = jnp.sum(xl * (p & 15).astype(f32), axis=0, keepdims=True)
            part = part + jnp.sum(xh * (p >> 4).astype(f32), axis=0, keepdims=True)
            xsum = jnp.sum(xl, axis=0, keepdims=True) + jnp.sum(xh, axis=0, keepdims=True)  # [1, 1]
        else:
            xl = x_ref[:, pl.ds(k0, h)]
            xh = x_ref[:, pl.ds(k0 + h, h)]
            dims = (((1,), (0,)), ((), ()))
            part = lax.dot_general(xl, (p & 15).astype(xl.dtype), dims, preferred_element_type=f32)
            part = part + lax.dot_general(xh, (p >> 4).astype(xh.dtype), dims, preferred_element_type=f32)
            xsum = jnp.sum(xl.astype(f32), axis=1, keepdims=True) + jnp.sum(xh.astype(f32), axis=1, keepdims=True)
        s = s_ref[pl.ds(g, 1), :].astype(f32)
        o = o_ref[pl.ds(g, 1), :].astype(f32)
        return acc + part * s + xsum * o

    acc = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), f32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _default_config(M):
    """(block_m, block_n, num_warps, num_stages)."""
    if M <= 16:
        return 16, 64, 4, 4
    if M <= 64:
        return 64, 64, 4, 4
    return 128, 128, 8, 3


_STATIC = ("group_size", "block_m", "block_n", "interpret", "out_dtype", "num_warps", "num_stages", "group_m", "splits")


@functools.partial(jax.jit, static_argnames=_STATIC)
def int4_matmul(
    x,
    packed,
    scales,
    offsets,
    *,
    group_size: int,
    block_m=None,
    block_n=None,
    interpret=None,
    out_dtype=None,
    num_warps=None,
    num_stages=None,
    group_m=8,
    splits=None,
):
    """x [M, K] @ int4 weight (packed [K // 2, N], scales/offsets [K // G, N]) -> [M, N]."""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    check_group_size(group_size)
    M, K = x.shape
    K2, N = packed.shape
    if packed.dtype != jnp.uint8 or 2 * K2 != K or K % group_size:
        raise ValueError(f"bad int4 weight {packed.dtype}{packed.shape} for x {x.shape}, group_size {group_size}")
    if scales.shape != (K // group_size, N) or offsets.shape != scales.shape:
        raise ValueError(f"bad scales {scales.shape} / offsets {offsets.shape} for {K // group_size} groups x {N}")
    if resolve_interpret(interpret) and interpret is not True:  # as matmul.use_xla, patchable here
        return int4_matmul_xla(x, packed, scales, offsets, group_size).astype(out_dtype)

    dbm, dbn, dw, dst = _default_config(M)
    gemv = M == 1
    bm = 1 if gemv else min(block_m or dbm, max(MIN_BLOCK, next_pow2(M)))
    bn = pick_block(N, block_n or dbn)
    Mp, Np = round_up(M, bm), round_up(N, bn)
    ngroups = K // group_size
    x = x.reshape(K, 1) if gemv else pad2(x, Mp, K)
    packed, scales, offsets = pad2(packed, K2, Np), pad2(scales, ngroups, Np), pad2(offsets, ngroups, Np)
    nm, nn = Mp // bm, Np // bn
    ks = pick_splits(nm * nn, ngroups, splits) if M <= 64 else (splits or 1)
    ids = lambda pid: grouped_ids(pid, nm, nn, group_m)
    cols = lambda pid, s: (0, ids(pid)[1])
    out = pl.pallas_call(
        functools.partial(_int4_kernel, group_size=group_size, steps=ngroups // ks, gemv=gemv),
        grid=(nm * nn, ks),
        in_specs=[
            block_spec((K, 1), lambda pid, s: (0, 0)) if gemv else block_spec((bm, K), lambda pid, s: (ids(pid)[0], 0)),
            block_spec((K2, bn), cols),
            block_spec((ngroups, bn), cols),
            block_spec((ngroups, bn), cols),
        ],
        out_specs=block_spec((bm, bn), lambda pid, s: (ids(pid)[0], s * nn + ids(pid)[1])),
        out_shape=jax.ShapeDtypeStruct((Mp, ks * Np), out_dtype if ks == 1 else f32),
        compiler_params=triton_params(num_warps or dw, num_stages or dst),
        interpret=resolve_interpret(interpret),
        name="int4_matmul",
    )(x, packed, scales, offsets)
    if ks > 1:
        out = out.reshape(Mp, ks, Np).sum(axis=1).astype(out_dtype)
    return out[:M, :N]

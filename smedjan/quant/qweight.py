"""A quantized linear weight as a pytree leaf type, and the matmul that runs it.

`QuantizedWeight` replaces a float weight under the same parameter name. Its arrays keep any leading
axes of the weight it replaces (the stacked layer axis: `lax.scan` over layers slices every field at
once), followed by the kernel's layout, input-major:

* int8 (per output channel): q [..., K, N] int8, scales [..., N] float32; w = q * scales.
* int4 (group-wise, asymmetric): q [..., Kp // 2, N] uint8 with two 4-bit codes a byte
  (`pallas_kernels.int4_matmul.pack_int4`), scales and offsets [..., Kp // G, N] float16;
  w = code * scale + offset. Kp is K padded with zero rows to whole groups.
* in_scale [..., K] float32 or None: a per-input-channel factor applied to x before the product
  (activation-aware scaling, smedjan/quant/awq.py: the weight was quantized as W / in_scale).

`qmatmul` is what `smedjan.model.transformer.linear` calls for such a weight: the Pallas kernels on
GPU (weights dequantized in registers), XLA's dequantize-then-dot elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from pallas_kernels.int4_matmul import check_group_size, dequantize_int4, int4_matmul, pack_int4
from pallas_kernels.matmul import int8_matmul

f32 = jnp.float32
SCHEMES = ("int8", "int4")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantizedWeight:
    q: jax.Array
    scales: jax.Array
    offsets: jax.Array | None = None
    in_scale: jax.Array | None = None
    bits: int = field(default=8, metadata=dict(static=True))
    group_size: int = field(default=0, metadata=dict(static=True))  # int4 only
    in_features: int = field(default=0, metadata=dict(static=True))  # K before padding
    out_shape: tuple = field(default=(), metadata=dict(static=True))  # joined weights' output axes

    @property
    def scheme(self) -> str:
        return f"int{self.bits}"

    @property
    def out_features(self) -> int:
        return self.q.shape[-1]

    def linear(self, x):
        """x [..., in] -> [..., out]: what `smedjan.model.transformer.linear` runs for this weight."""
        return qmatmul(x, self)

    def map(self, f) -> QuantizedWeight:
        """Apply `f` to every array field."""
        return jax.tree.map(f, self)

    def __getitem__(self, i) -> QuantizedWeight:
        """Layer i of a stacked weight (as indexing a stacked float weight does)."""
        return self.map(lambda a: a[i])


def is_quantized(w) -> bool:
    return isinstance(w, QuantizedWeight)


# ---- quantizing (round to nearest) ---------------------------------------------------------------
def quantize_int8(w_t) -> QuantizedWeight:
    """Symmetric per-output-channel int8 of w_t [..., K, N] (input-major)."""
    w_t = jnp.asarray(w_t, f32)
    amax = jnp.max(jnp.abs(w_t), axis=-2)
    scales = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w_t / scales[..., None, :]), -127, 127).astype(jnp.int8)
    return QuantizedWeight(q=q, scales=scales, bits=8, in_features=w_t.shape[-2])


def int4_codes(w_t, group_size: int):
    """Asymmetric min/max int4 of w_t [..., K, N]: (codes [..., Kp, N] uint8, scales, offsets [..., Kp // G, N] f32).
    K is padded to whole groups (the padded rows meet zero-padded inputs)."""
    w_t = jnp.asarray(w_t, f32)
    K = w_t.shape[-2]
    Kp = -(-K // group_size) * group_size
    if Kp != K:
        # edge rows: the padding never widens a group's range (it meets zero inputs anyway)
        w_t = jnp.pad(w_t, [(0, 0)] * (w_t.ndim - 2) + [(0, Kp - K), (0, 0)], mode="edge")
    g = w_t.reshape(*w_t.shape[:-2], Kp // group_size, group_size, w_t.shape[-1])
    lo, hi = jnp.min(g, axis=-2), jnp.max(g, axis=-2)
    scales = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0)
    # Round the scale and offset to what is stored first, then pick codes against those.
    scales = scales.astype(jnp.float16).astype(f32)
    offsets = lo.astype(jnp.float16).astype(f32)
    codes = jnp.clip(jnp.round((g - offsets[..., None, :]) / scales[..., None, :]), 0, 15)
    return codes.reshape(w_t.shape).astype(jnp.uint8), scales, offsets


def quantize_int4(w_t, group_size: int) -> QuantizedWeight:
    check_group_size(group_size)
    codes, scales, offsets = int4_codes(w_t, group_size)
    return QuantizedWeight(
        q=pack_int4(codes, group_size),
        scales=scales.astype(jnp.float16),
        offsets=offsets.astype(jnp.float16),
        bits=4,
        group_size=group_size,
        in_features=w_t.shape[-2],
    )


def quantize(w, scheme: str, group_size: int = 128, in_scale=None) -> QuantizedWeight:
    """A float weight in HF's [..., out, in] layout -> QuantizedWeight (round to nearest).

    in_scale [..., in]: quantize w / in_scale instead and apply in_scale to x at run time (AWQ)."""
    w_t = jnp.swapaxes(jnp.asarray(w, f32), -1, -2)  # [..., K, N]
    if in_scale is not None:
        w_t = w_t / jnp.asarray(in_scale, f32)[..., :, None]
    if scheme == "int8":
        qw = quantize_int8(w_t)
    elif scheme == "int4":
        qw = quantize_int4(w_t, group_size)
    else:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {SCHEMES}")
    if in_scale is not None:
        qw = QuantizedWeight(**{**_fields(qw), "in_scale": jnp.asarray(in_scale, f32)})
    return qw


def _fields(w: QuantizedWeight) -> dict:
    """Every field but out_shape (a joined weight's own)."""
    return dict(
        q=w.q,
        scales=w.scales,
        offsets=w.offsets,
        in_scale=w.in_scale,
        bits=w.bits,
        group_size=w.group_size,
        in_features=w.in_features,
    )


# ---- using ----------------------------------------------------------------------------------------
def dequantize(w: QuantizedWeight, dtype=f32):
    """The float weight back in HF's [..., out, in] layout (in_scale folded back in)."""
    if w.bits == 8:
        w_t = w.q.astype(f32) * w.scales[..., None, :].astype(f32)
    else:
        w_t = dequantize_int4(w.q, w.scales, w.offsets, w.group_size)
    w_t = w_t[..., : w.in_features, :]
    if w.in_scale is not None:
        w_t = w_t * w.in_scale[..., :, None]
    return jnp.swapaxes(w_t, -1, -2).astype(dtype)


def qmatmul(x, w: QuantizedWeight):
    """x [..., K] · w -> [..., N] (or [..., *out_shape]) in x's dtype (one weight, no stacked axis)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if w.in_scale is not None:
        x2 = (x2.astype(f32) * w.in_scale.astype(f32)).astype(x.dtype)
    if w.bits == 8:
        y = int8_matmul(x2, w.q, w.scales)
    else:
        kp = 2 * w.q.shape[-2]
        if kp != x2.shape[1]:
            x2 = jnp.pad(x2, ((0, 0), (0, kp - x2.shape[1])))
        y = int4_matmul(x2, w.q, w.scales, w.offsets, group_size=w.group_size)
    return y.reshape(*lead, *(w.out_shape or (w.out_features,)))


def join_outputs(ws: list[QuantizedWeight], out_shape: tuple, groups: int = 1) -> QuantizedWeight:
    """Weights that read the same input (q/k/v, gate/up) as one, run by one kernel call, whose product
    has shape [..., *out_shape]. Each weight's outputs are split into `groups` equal groups and the
    groups interleaved: q/k/v with groups Hkv, out_shape (Hkv, G + 2, hd) give the model's joined
    layout, per kv head its G query heads, its k, its v; gate/up (groups 1, out_shape (2, F)) are one
    after the other. The weights must share scheme, group size and in_scale (AWQ searches one scale
    per such group)."""
    first = ws[0]
    for w in ws[1:]:
        if (w.bits, w.group_size, w.in_features) != (first.bits, first.group_size, first.in_features):
            raise ValueError("cannot join quantized weights of different schemes")

    def join(name):
        parts = [getattr(w, name) for w in ws]
        if parts[0] is None:
            return None
        split = [p.reshape(*p.shape[:-1], groups, p.shape[-1] // groups) for p in parts]
        cat = jnp.concatenate(split, axis=-1)
        return cat.reshape(*cat.shape[:-2], -1)

    return QuantizedWeight(
        **{**_fields(first), "q": join("q"), "scales": join("scales"), "offsets": join("offsets")},
        out_shape=tuple(out_shape),
    )


def nbytes(w) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(w))

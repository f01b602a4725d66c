"""The primitives every part of the model is built from: the projection and the norm.

`linear` is the one entry point of every weight matrix in the model (attention, MLP, head), so a
new weight representation (a quantized leaf) is handled in one place; `project` is a layer's named
projection through it, plus the LoRA update when the layer's params carry one (`model/lora.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from smedjan.model import lora


def rms_norm(x, weight, eps):
    """Normalise in float32 and cast back before scaling, exactly as HF's LlamaRMSNorm."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


def inv_rms(x, eps):
    """1/rms of x over its last axis, float32 [..., 1]."""
    xf = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def pre_norm(x, weight, eps):
    """An RMSNorm in front of projections: (input, output scale) for `linear`.

    With the norm weight present, the normalised x and no scale (HF's exact rounding, what training
    differentiates). With it folded into the consuming matrices (`weight` None, see
    `transformer.prepare`): x itself and its 1/rms, applied to the float32 product, so the
    normalised vector is never materialised (one small kernel less per norm per layer when decoding).
    """
    if weight is None:
        return x, inv_rms(x, eps)
    return rms_norm(x, weight, eps), None


def linear(x, w, b=None, *, scale=None):
    """x [..., in] · w[*out, in] -> [..., *out] (+ b [*out]).

    `w` keeps HF's [out, in] layout; joined weights carry more output axes (e.g. [Hkv, G+2, hd, in]).
    The product runs on w viewed as [prod(out), in], the output reshaped after: the plain 2-D GEMM/GEMV
    the separate decoder ran. (With multi-axis dots the one decoder's 1b batch-1 decode measured 6%
    slower than that decoder in the same H200 run; not yet profiled which op cost it.)
    A weight object with a `linear(x)` method (smedjan/quant/qweight.py's QuantizedWeight: the
    Pallas int8/int4 kernels on GPU) computes the product itself, in the same output shape.
    `scale` [..., 1]: multiplies the float32 product before the cast and the bias (a folded norm).
    """
    if hasattr(w, "linear"):  # a weight object computing its own product: a quantized weight, a probe
        y = w.linear(x)
        if scale is not None:
            y = (y.astype(jnp.float32) * scale.reshape(scale.shape + (1,) * (y.ndim - scale.ndim))).astype(x.dtype)
        return y if b is None else y + b.astype(x.dtype)
    out_shape = w.shape[:-1]
    w = w.reshape(-1, w.shape[-1]).astype(x.dtype)
    if scale is None:
        y = jnp.einsum("...i,oi->...o", x, w)
    else:
        y = (jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32) * scale).astype(x.dtype)
    y = y.reshape(*y.shape[:-1], *out_shape)
    return y if b is None else y + b.astype(x.dtype)


def project(x, p, name, *, scale=None):
    """Layer projection `name` ("mlp.down_proj") of x, with its bias and LoRA update when present."""
    y = linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"), scale=scale)
    return plus_lora(y, x, p, name)


def plus_lora(y, x, p, name):
    """y + the LoRA update of projection `name` on input x (none without an adapter), in y's shape.
    The update reads x normalised: with adapters the norms stay unfolded (`transformer.prepare`)."""
    d = lora.delta(x, p, name)
    return y if d is None else y + d.reshape(y.shape)

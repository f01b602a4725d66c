"""One attention entry point with interchangeable implementations.

Layout everywhere is [batch, seq, heads, head_dim] ("BTNH", as jax.nn uses). K/V
keep their own (fewer) heads: GQA groups query heads onto a kv head by reshaping
the queries, so repeated K/V never exist in memory.

Masking is by absolute positions, which serves training (positions 0..S-1) and
cached decoding (a query at position p sees cache slots j <= p) with one rule:
    visible(i, j) = kv_pos[j] <= q_pos[i]  and  kv_pos[j] > q_pos[i] - window
                    and  segment[i] == segment[j]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLS = ("auto", "xla", "cudnn", "pallas")


def resolve_impl(impl: str) -> str:
    """'auto' picks the fastest measured path for the backend (see benchmarks/RESULTS.md)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if jax.default_backend() != "gpu":
        return "xla"
    # On Hopper the Mosaic GPU flash kernel beats cuDNN for training shapes (fwd+bwd 1.15x at
    # 125m's S=1024 D=64, 1.05x at S=4k; benchmarks/RESULTS.md); elsewhere cuDNN is fastest.
    from pallas_kernels.flash_attention_mgpu import available

    return "pallas" if available() else "cudnn"


def attention_mask(q_pos, kv_pos, sliding_window=None, q_segment=None, kv_segment=None):
    """Boolean [B, 1, 1, S, T] mask (broadcasts over kv heads and groups)."""
    visible = kv_pos[:, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        visible &= kv_pos[:, None, :] > q_pos[:, :, None] - sliding_window
    if q_segment is not None:
        visible &= q_segment[:, :, None] == kv_segment[:, None, :]
    return visible[:, None, None]


def xla_attention(q, k, v, mask, scale):
    """Reference-quality attention in plain XLA ops: softmax in float32 like transformers."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, s, hkv, hq // hkv, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, hq, d)


def per_device(kernel, q, k, v, *rows):
    """`kernel(q, k, v, *rows)` on each device's part of the batch (and heads) under the mesh the step is
    traced with (`smedjan.sharding.mesh_context`); rows are [B, S] arrays.

    GSPMD cannot split a custom kernel call: left to itself it gathers q/k/v and every device runs
    the whole batch's attention (on 2 H100s, 1b data parallel: 54 ms of attention per device per step
    for half the batch, against 45 ms for all of it on one GPU). A `shard_map` splits the batch over
    the data and fsdp axes, and the heads over `tensor` where both head counts divide (query head h
    uses kv head h // G, so equal contiguous blocks stay matched).
    """
    from smedjan.sharding import BATCH_AXES

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return kernel(q, k, v, *rows)
    sizes = dict(mesh.shape)
    axes = tuple(a for a in BATCH_AXES if a in sizes)
    batch = axes if axes and q.shape[0] % math.prod(sizes[a] for a in axes) == 0 else None
    t = sizes.get("tensor", 1)
    split_heads = t > 1 and q.shape[2] % t == 0 and k.shape[2] % t == 0
    heads = P(batch, None, "tensor" if split_heads else None, None)
    return jax.shard_map(
        kernel, mesh=mesh, in_specs=(heads,) * 3 + (P(batch, None),) * len(rows), out_specs=heads, check_vma=False
    )(q, k, v, *rows)


def attention(q, k, v, *, q_pos, kv_pos, sliding_window=None, segment_ids=None, impl="xla", decoding=False):
    """Causal attention by absolute positions.

    q [B,S,Hq,D]; k, v [B,T,Hkv,D]; q_pos [B,S]; kv_pos [B,T].
    `decoding=True` means k/v are a KV cache longer than the query block (generation).
    """
    impl = resolve_impl(impl)
    scale = q.shape[-1] ** -0.5
    if impl == "pallas":
        if decoding:
            from pallas_kernels.decode_attention import decode_attention

            return per_device(
                lambda q, k, v, pos: decode_attention(q, k, v, pos, sliding_window=sliding_window, sm_scale=scale),
                q,
                k,
                v,
                q_pos,
            )
        from pallas_kernels.flash_attention import flash_attention

        return per_device(
            lambda q, k, v, *seg: flash_attention(
                q, k, v, causal=True, sliding_window=sliding_window, segment_ids=seg[0] if seg else None, sm_scale=scale
            ),
            q,
            k,
            v,
            *(() if segment_ids is None else (segment_ids,)),
        )
    if impl == "cudnn" and not decoding and segment_ids is None and q.dtype in (jnp.bfloat16, jnp.float16):
        # cuDNN's own causal mask assumes positions 0..S-1, which training batches have; it takes only
        # 16-bit inputs, so float32 (reference-precision) runs fall through to XLA.
        window = None if sliding_window is None else (sliding_window - 1, 0)
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, local_window_size=window, implementation="cudnn"
        )
    mask = attention_mask(q_pos, kv_pos, sliding_window, segment_ids, segment_ids)
    return xla_attention(q, k, v, mask, scale)

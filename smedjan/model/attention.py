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
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from smedjan.backend import ATTN_IMPLS
from smedjan.config import ModelConfig
from smedjan.model.cache import KVCache
from smedjan.model.layers import linear, plus_lora, pre_norm, project, rms_norm
from smedjan.model.rope import apply_rope


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


def attention(
    q, k, v, *, q_pos, kv_pos, sliding_window=None, segment_ids=None, impl="xla", decoding=False, interpret=None
):
    """Causal attention by absolute positions.

    q [B,S,Hq,D]; k, v [B,T,Hkv,D]; q_pos [B,S]; kv_pos [B,T].
    impl: "xla", "cudnn" or "pallas" (`smedjan.backend` picks it per platform).
    `decoding=True` means k/v are a KV cache longer than the query block (generation).
    interpret: run a Pallas kernel in interpret mode (None: off a GPU only).
    """
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTN_IMPLS}, got {impl!r}")
    scale = q.shape[-1] ** -0.5
    if impl == "pallas":
        if decoding:
            from pallas_kernels.decode_attention import decode_attention

            return per_device(
                lambda q, k, v, pos: decode_attention(
                    q, k, v, pos, sliding_window=sliding_window, sm_scale=scale, interpret=interpret
                ),
                q,
                k,
                v,
                q_pos,
            )
        from pallas_kernels.flash_attention import flash_attention

        return per_device(
            lambda q, k, v, *seg: flash_attention(
                q,
                k,
                v,
                causal=True,
                sliding_window=sliding_window,
                segment_ids=seg[0] if seg else None,
                sm_scale=scale,
                interpret=interpret,
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


# ---- the attention part of a block --------------------------------------------------------------
def qkv_proj(x, p, cfg: ModelConfig, scale=None):
    """q [..., H, hd], k and v [..., Hkv, hd]: one GEMM on joined weights (`transformer.prepare_layers`), else three.

    Joined q/k/v are grouped per kv head, [Hkv, G + 2, hd, D]: its G query heads, its k, its v."""
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if "qkv" not in p:

        def proj(n, heads):
            return project(x, p, f"self_attn.{n}_proj", scale=scale).reshape(*x.shape[:-1], heads, hd)

        return proj("q", hq), proj("k", hkv), proj("v", hkv)
    y = linear(x, p["qkv"], p.get("qkv_bias"), scale=scale)
    q, k, v = jnp.split(y, [hq // hkv, hq // hkv + 1], axis=-2)
    q, k, v = q.reshape(*q.shape[:-3], hq, hd), k[..., 0, :], v[..., 0, :]
    return tuple(plus_lora(t, x, p, f"self_attn.{n}_proj") for t, n in ((q, "q"), (k, "k"), (v, "v")))


def _fused_decode_kernel(p, cfg: ModelConfig, ctx) -> bool:
    """Does this decode step run the fused Pallas decode-layer kernel (rope, cache write, attention)?"""
    if ctx.step is None or not ctx.step.decoding or ctx.backend.decode_impl != "pallas_fused":
        return False
    if "qkv" not in p or cfg.qk_norm or any(f"self_attn.{n}_proj.lora_A.weight" in p for n in "qkv"):
        return False
    from pallas_kernels.decode_layer_attention import supported

    return supported(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)


def attention_block(x, p, cfg: ModelConfig, ctx, cache: KVCache | None):
    """The block's attention branch, its pre-norm included. Returns (output [B, S, D], updated cache).

    ctx: `transformer.Ctx` (backend, rope factors, positions, segment ids, and `step`: how this
    pass meets the cache; None when there is no cache)."""
    b, s, _ = x.shape
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    xn, scale = pre_norm(x, p.get("input_layernorm.weight"), cfg.rms_norm_eps)
    step, backend = ctx.step, ctx.backend
    if _fused_decode_kernel(p, cfg, ctx):
        from pallas_kernels.decode_layer_attention import decode_layer_attention

        # One Pallas kernel after the qkv GEMV: rope, both cache writes (in place) and the attention
        # of the new token (pallas_kernels/decode_layer_attention.py).
        qkv = linear(xn, p["qkv"], p.get("qkv_bias"), scale=scale)
        out, k_cache, v_cache = decode_layer_attention(
            qkv.reshape(b, -1),
            ctx.cos.reshape(b, hd),
            ctx.sin.reshape(b, hd),
            step.positions[:, 0],
            cache.k,
            cache.v,
            num_heads=hq,
            num_kv_heads=hkv,
            head_dim=hd,
            sliding_window=cfg.sliding_window,
            kv_len=step.kv_len,
            grouped=True,
            interpret=backend.interpret,
        )
        cache = KVCache(k_cache, v_cache)
    else:
        q, k, v = qkv_proj(xn, p, cfg, scale)
        if cfg.qk_norm:  # Qwen3 normalises each head before RoPE
            q = rms_norm(q, p["self_attn.q_norm.weight"], cfg.rms_norm_eps)
            k = rms_norm(k, p["self_attn.k_norm.weight"], cfg.rms_norm_eps)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if cache is not None:
            cache = cache.write(k, v, step)
        if cache is None or not step.attend_cache:
            # The block is the whole sequence (training, or a prefill into empty rows).
            impl = backend.attn_impl if cache is None else backend.prefill_impl
            out = attention(
                q,
                k,
                v,
                q_pos=ctx.positions,
                kv_pos=ctx.positions,
                sliding_window=cfg.sliding_window,
                segment_ids=ctx.segment_ids,
                impl=impl,
                interpret=backend.interpret,
            )
        else:
            # Attend over the cache; slots past a query's position are masked, so stale entries from
            # earlier requests are harmless. The split-K kernel (one token per row) skips them itself.
            impl = {"pallas_fused": "pallas"}.get(backend.decode_impl, backend.decode_impl)
            if s > 1 and impl == "pallas":
                impl = "xla"  # the Pallas decode kernel takes one query per row
            kk, vv = cache.read(step, whole=impl == "pallas")
            kv_pos = jnp.broadcast_to(jnp.arange(kk.shape[1], dtype=jnp.int32), (b, kk.shape[1]))
            out = attention(
                q,
                kk.astype(q.dtype),
                vv.astype(q.dtype),
                q_pos=ctx.positions,
                kv_pos=kv_pos,
                sliding_window=cfg.sliding_window,
                impl=impl,
                decoding=True,
                interpret=backend.interpret,
            )
    # Named so a remat policy can keep it: the attention kernel is then not re-run in the backward.
    out = checkpoint_name(out.reshape(b, s, hq * hd), "attn_out")
    return project(out, p, "self_attn.o_proj"), cache

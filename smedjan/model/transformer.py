"""The decoder-only transformer, top to bottom.

Parameters are a flat dict keyed by Hugging Face tensor names. Per-layer tensors are
stacked on a leading layer axis under the name with the index dropped
("model.layers.self_attn.q_proj.weight" holds every layer's q_proj), so the layer
stack runs as one `lax.scan` and compile time does not grow with depth. Weights keep
HF's [out, in] layout; checkpoint I/O is then a reshape, never a transpose. q/k/v and gate/up
stay separate parameters; on GPU the forward joins each group (a small copy of the weights) to
run it as one GEMM.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from smedjan.config import ModelConfig
from smedjan.model import lora
from smedjan.model.attention import attention
from smedjan.model.rope import apply_rope, rope_cos_sin

LAYER_PREFIX = "model.layers."


# ---- parameters ------------------------------------------------------------------------------
def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, f, hd, n = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    L = LAYER_PREFIX
    shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, d),
        L + "input_layernorm.weight": (n, d),
        L + "self_attn.q_proj.weight": (n, q, d),
        L + "self_attn.k_proj.weight": (n, kv, d),
        L + "self_attn.v_proj.weight": (n, kv, d),
        L + "self_attn.o_proj.weight": (n, d, q),
        L + "post_attention_layernorm.weight": (n, d),
        L + "mlp.gate_proj.weight": (n, f, d),
        L + "mlp.up_proj.weight": (n, f, d),
        L + "mlp.down_proj.weight": (n, d, f),
        "model.norm.weight": (d,),
    }
    if cfg.qkv_bias:
        shapes.update(
            {
                L + "self_attn.q_proj.bias": (n, q),
                L + "self_attn.k_proj.bias": (n, kv),
                L + "self_attn.v_proj.bias": (n, kv),
            }
        )
    if cfg.o_bias:
        shapes[L + "self_attn.o_proj.bias"] = (n, d)
    if cfg.qk_norm:
        shapes.update({L + "self_attn.q_norm.weight": (n, hd), L + "self_attn.k_norm.weight": (n, hd)})
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def init_params(cfg: ModelConfig, key, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Normal(0, 0.02) matrices, with output projections scaled by 1/sqrt(2·layers) (GPT-2)."""
    shapes = param_shapes(cfg)
    keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
    params = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            params[name] = jnp.ones(shape, dtype)
        elif name.endswith(".bias"):
            params[name] = jnp.zeros(shape, dtype)
        else:
            std = 0.02
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std /= (2 * cfg.num_hidden_layers) ** 0.5
            params[name] = (std * jax.random.normal(keys[name], shape, jnp.float32)).astype(dtype)
    return params


def lm_head(params: dict, cfg: ModelConfig) -> jax.Array:
    return params["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]


def layer_params(params: dict) -> dict:
    return {k[len(LAYER_PREFIX) :]: v for k, v in params.items() if k.startswith(LAYER_PREFIX)}


# ---- building blocks ---------------------------------------------------------------------------
def rms_norm(x, weight, eps):
    """Normalise in float32 and cast back before scaling, exactly as HF's LlamaRMSNorm."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


def linear(x, w, b=None):
    """x [..., in] · w[out, in]^T (+ b)."""
    y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
    return y if b is None else y + b.astype(x.dtype)


def project(x, p, name):
    """Layer projection `name` ("mlp.down_proj") of x, plus its LoRA update when the params carry one."""
    y = linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))
    d = lora.delta(x, p, name)
    return y if d is None else y + d


def _plus_lora(y, x, p, name):
    d = lora.delta(x, p, name)
    return y if d is None else y + d.reshape(y.shape)


FUSE_PROJECTIONS: bool | None = None  # None: on GPU only (see _fuse)


def _fuse() -> bool:
    """Run q/k/v and gate/up as one GEMM each? On the H100 it took the 125m step from 36.5 to 33.4 ms;
    on CPU XLA runs the separate GEMMs faster (the main job's step measured 3-10% slower fused)."""
    return jax.default_backend() == "gpu" if FUSE_PROJECTIONS is None else FUSE_PROJECTIONS


def fuse_layer_weights(layers: dict, cfg: ModelConfig, dtype) -> dict:
    """The stacked layer weights in the compute dtype, cast once for the whole stack (one kernel per
    tensor instead of one per layer: the small presets are launch bound); when `_fuse()`, q/k/v
    joined into "qkv" and gate/up into "gate_up", so each runs as one GEMM.

    Joined q/k/v are grouped per kv head, [L, Hkv, G + 2, hd, D]: its G query heads, its k, its v
    (HF's GQA gives query head h the kv head h // G); gate/up are stacked on a new axis,
    [L, 2, F, D]. Either way a tensor-parallel split of heads or of F stays local. With separate
    projections XLA merges their weight-gradient GEMMs itself (they share x) and first copies the
    cotangents into one activation-sized buffer; joined, the backward writes them in one pass.
    """
    # LoRA dropout keys are integers: only floating tensors take the compute dtype
    layers = {k: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in layers.items()}
    if not _fuse():
        return layers
    hkv, hd = cfg.num_key_value_heads, cfg.head_dim

    def grouped(kind):
        names = [f"self_attn.{n}_proj.{kind}" for n in "qkv"]
        ts = [layers.pop(n) for n in names]
        return jnp.concatenate([t.reshape(t.shape[0], hkv, -1, hd, *t.shape[2:]) for t in ts], axis=2)

    layers["qkv"] = grouped("weight")
    if "self_attn.q_proj.bias" in layers:
        layers["qkv_bias"] = grouped("bias")
    layers["gate_up"] = jnp.stack([layers.pop("mlp.gate_proj.weight"), layers.pop("mlp.up_proj.weight")], axis=1)
    return layers


def mlp(x, p):
    if "gate_up" in p:
        gu = jnp.einsum("...d,kfd->...kf", x, p["gate_up"].astype(x.dtype))
        gate, up = _plus_lora(gu[..., 0, :], x, p, "mlp.gate_proj"), _plus_lora(gu[..., 1, :], x, p, "mlp.up_proj")
    else:
        gate, up = project(x, p, "mlp.gate_proj"), project(x, p, "mlp.up_proj")
    # Named so a remat policy can keep the SwiGLU product (re-deriving it reads all of gate and up).
    act = checkpoint_name(jax.nn.silu(gate) * up, "mlp_act")
    return project(act, p, "mlp.down_proj")


def qkv_proj(x, p, cfg: ModelConfig):
    """q [..., H, hd], k and v [..., Hkv, hd]: one GEMM on joined weights (`fuse_layer_weights`), else three."""
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if "qkv" not in p:

        def proj(n, heads):
            return project(x, p, f"self_attn.{n}_proj").reshape(*x.shape[:-1], heads, hd)

        return proj("q", hq), proj("k", hkv), proj("v", hkv)

    y = jnp.einsum("...d,kghd->...kgh", x, p["qkv"].astype(x.dtype))
    if "qkv_bias" in p:
        y = y + p["qkv_bias"].astype(x.dtype)
    q, k, v = jnp.split(y, [hq // hkv, hq // hkv + 1], axis=-2)
    q = q.reshape(*q.shape[:-3], hq, hd)
    k, v = k[..., 0, :], v[..., 0, :]
    return (
        _plus_lora(q, x, p, "self_attn.q_proj"),
        _plus_lora(k, x, p, "self_attn.k_proj"),
        _plus_lora(v, x, p, "self_attn.v_proj"),
    )


def self_attention(x, p, cfg: ModelConfig, cos, sin, q_pos, cache_kv, segment_ids, impl):
    """Returns the attention output and, when decoding, the updated (k, v) cache of this layer."""
    b, s, _ = x.shape
    hd = cfg.head_dim
    q, k, v = qkv_proj(x, p, cfg)
    if cfg.qk_norm:  # Qwen3 normalises each head before RoPE
        q = rms_norm(q, p["self_attn.q_norm.weight"], cfg.rms_norm_eps)
        k = rms_norm(k, p["self_attn.k_norm.weight"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    if cache_kv is None:
        out = attention(
            q, k, v, q_pos=q_pos, kv_pos=q_pos, sliding_window=cfg.sliding_window, segment_ids=segment_ids, impl=impl
        )
        new_cache = None
    else:
        # Write this block's k/v at their absolute positions, then attend over the whole cache;
        # slots past a query's position are masked, so stale entries from earlier requests are harmless.
        ck, cv = cache_kv
        rows = jnp.arange(b)[:, None]
        ck = ck.at[rows, q_pos].set(k.astype(ck.dtype), mode="drop")
        cv = cv.at[rows, q_pos].set(v.astype(cv.dtype), mode="drop")
        kv_pos = jnp.broadcast_to(jnp.arange(ck.shape[1]), (b, ck.shape[1]))
        out = attention(
            q,
            ck.astype(q.dtype),
            cv.astype(q.dtype),
            q_pos=q_pos,
            kv_pos=kv_pos,
            sliding_window=cfg.sliding_window,
            impl=impl,
            decoding=True,
        )
        new_cache = (ck, cv)
    # Named so a remat policy can keep it: the attention kernel is then not re-run in the backward.
    out = checkpoint_name(out.reshape(b, s, cfg.num_attention_heads * hd), "attn_out")
    return project(out, p, "self_attn.o_proj"), new_cache


def decoder_layer(x, p, cfg, cos, sin, q_pos, cache_kv, segment_ids, impl):
    h, new_cache = self_attention(
        rms_norm(x, p["input_layernorm.weight"], cfg.rms_norm_eps), p, cfg, cos, sin, q_pos, cache_kv, segment_ids, impl
    )
    x = x + h
    x = x + mlp(rms_norm(x, p["post_attention_layernorm.weight"], cfg.rms_norm_eps), p)
    return x, new_cache


# ---- the model ---------------------------------------------------------------------------------
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def default_scan_unroll() -> int | bool:
    return True if jax.default_backend() == "gpu" else 1


def forward(
    params: dict,
    tokens,
    cfg: ModelConfig,
    *,
    positions=None,
    segment_ids=None,
    cache=None,
    attn_impl: str = "xla",
    remat: str = "none",
    compute_dtype=None,
    return_hidden: bool = False,
    scan_unroll: int | bool | None = None,
):
    """tokens [B, S] int32 -> logits [B, S, V] (or final hidden states [B, S, D]).

    positions: absolute positions [B, S] (default 0..S-1).
    cache: {"k", "v"} of [L, B, T, Hkv, D] from `init_cache`; when given, returns (out, new_cache).
    compute_dtype: cast weights and activations to this dtype (e.g. bf16 over fp32 master weights).
    scan_unroll: `lax.scan`'s unroll of the layer loop (True: fully unrolled, one copy per layer);
        None: unrolled on GPU, where the step then runs as one CUDA graph (the 125m train step
        +13%, the small forward +46% on the H100), rolled elsewhere, where compile time matters more.
    """
    b, s = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    embed = params["model.embed_tokens.weight"]
    dtype = compute_dtype or embed.dtype
    x = jnp.take(embed, tokens, axis=0).astype(dtype)
    cos, sin = rope_cos_sin(cfg, positions, seq_len=jnp.max(positions) + 1)
    layers = fuse_layer_weights(layer_params(params), cfg, dtype)
    if scan_unroll is None:
        scan_unroll = default_scan_unroll()

    def body(x, xs):
        p, cache_kv = xs
        x, new_cache = decoder_layer(x, p, cfg, cos, sin, positions, cache_kv, segment_ids, attn_impl)
        return x, new_cache

    if remat != "none":
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {remat!r}")
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    cache_xs = None if cache is None else (cache["k"], cache["v"])
    x, new_cache = jax.lax.scan(body, x, (layers, cache_xs), unroll=scan_unroll)
    x = rms_norm(x, params["model.norm.weight"], cfg.rms_norm_eps)
    out = x if return_hidden else linear(x, lm_head(params, cfg))
    if cache is None:
        return out
    return out, {"k": new_cache[0], "v": new_cache[1]}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict[str, jax.Array]:
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


@partial(jax.jit, static_argnames=("cfg", "attn_impl"))
def logits_fn(params, tokens, cfg: ModelConfig, attn_impl: str = "xla"):
    return forward(params, tokens, cfg, attn_impl=attn_impl)

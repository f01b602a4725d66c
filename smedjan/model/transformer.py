"""The decoder-only transformer, top to bottom.

Parameters are a flat dict keyed by Hugging Face tensor names. Per-layer tensors are
stacked on a leading layer axis under the name with the index dropped
("model.layers.self_attn.q_proj.weight" holds every layer's q_proj), so the layer
stack runs as one `lax.scan` and compile time does not grow with depth. Weights keep
HF's [out, in] layout; checkpoint I/O is then a reshape, never a transpose.

Every path runs the same blocks (`decoder_layer`: `attention.attention_block`, `mlp.mlp_block`):
training over the stacked params (joined and cast inside the step), prefill and decode over the
inference layout `prepare` builds once at load, with a per-layer cache (`cache.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from smedjan.backend import Backend, settings
from smedjan.config import ModelConfig
from smedjan.model import lora
from smedjan.model.attention import attention_block
from smedjan.model.cache import Pass
from smedjan.model.layers import linear, rms_norm
from smedjan.model.mlp import mlp_block
from smedjan.model.rope import rope_cos_sin
from smedjan.quant.qweight import join_outputs

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


# ---- the weights in the layout the blocks run on -------------------------------------------------
def prepare_layers(layers: dict, cfg: ModelConfig, backend: Backend, dtype, fold_norms: bool = False) -> dict:
    """The stacked layer weights (`layer_params`) in the compute dtype and the backend's layout.

    Cast once for the whole stack (one kernel per tensor instead of one per layer: the small presets
    are launch bound). With `backend.fuse_projections`, q/k/v joined into "qkv" and gate/up into
    "gate_up", so each runs as one GEMM: joined q/k/v are grouped per kv head, [L, Hkv, G + 2, hd, D]
    (its G query heads, its k, its v; HF's GQA gives query head h the kv head h // G), gate/up
    stacked on a new axis, [L, 2, F, D]. Either way a tensor-parallel split of heads or of F stays
    local. With separate projections XLA merges their weight-gradient GEMMs itself (they share x)
    and first copies the cotangents into one activation-sized buffer; joined, the backward writes
    them in one pass.

    fold_norms (inference, once at load): each RMSNorm weight multiplied into the matrices that
    consume the norm's output (in float32, rounded once) and dropped; the blocks then scale the
    projections' outputs by 1/rms (`layers.pre_norm`).
    """
    # A LoRA update reads the normalised x, and a quantized matrix (a weight object, `hasattr(w, "linear")`,
    # smedjan/quant/qweight.py) cannot absorb the norm weight: the norms then stay unfolded.
    quantized = any(hasattr(v, "linear") for v in layers.values())
    if fold_norms and not quantized and not any(".lora_A." in k for k in layers):
        layers = dict(layers)
        consumers = {
            "input_layernorm.weight": [f"self_attn.{n}_proj.weight" for n in "qkv"],
            "post_attention_layernorm.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
        }
        for norm, names in consumers.items():
            ln = layers.pop(norm).astype(jnp.float32)[:, None, :]
            for n in names:
                layers[n] = (layers[n].astype(jnp.float32) * ln).astype(dtype)
    # LoRA dropout keys are integers: only floating tensors take the compute dtype
    layers = {
        k: v.astype(dtype) if not hasattr(v, "linear") and jnp.issubdtype(v.dtype, jnp.floating) else v
        for k, v in layers.items()
    }
    if not backend.fuse_projections:
        return layers
    hkv, hd = cfg.num_key_value_heads, cfg.head_dim

    def grouped(kind):
        names = [f"self_attn.{n}_proj.{kind}" for n in "qkv"]
        ts = [layers.pop(n) for n in names]
        if quantized and kind == "weight":  # the same layout on the quantized output axis
            return join_outputs(ts, (hkv, cfg.num_attention_heads // hkv + 2, hd), groups=hkv)
        return jnp.concatenate([t.reshape(t.shape[0], hkv, -1, hd, *t.shape[2:]) for t in ts], axis=2)

    layers["qkv"] = grouped("weight")
    if "self_attn.q_proj.bias" in layers:
        layers["qkv_bias"] = grouped("bias")
    gate_up = [layers.pop("mlp.gate_proj.weight"), layers.pop("mlp.up_proj.weight")]
    layers["gate_up"] = join_outputs(gate_up, (2, cfg.intermediate_size)) if quantized else jnp.stack(gate_up, axis=1)
    return layers


def prepare(params: dict, cfg: ModelConfig, backend: Backend, dtype=None) -> dict:
    """Flat HF-named params -> the inference layout, once at load: {"embed", "head", "norm", "layers"}.

    "layers" is one dict per layer (`prepare_layers` with the norms folded, then unstacked): a decode
    step reads each layer's weights as their own buffers, with no per-step slicing of a stacked array.
    """
    if is_prepared(params):
        return params
    embed = params["model.embed_tokens.weight"]
    dtype = jnp.dtype(dtype or embed.dtype)
    stacked = prepare_layers(layer_params(params), cfg, backend, dtype, fold_norms=True)
    layers = _unstack(stacked, cfg.num_hidden_layers)
    e = embed.astype(dtype)
    head = e if cfg.tie_word_embeddings else lm_head(params, cfg)
    head = head if hasattr(head, "linear") else head.astype(dtype)
    return {"embed": e, "head": head, "norm": params["model.norm.weight"].astype(dtype), "layers": layers}


def is_prepared(w) -> bool:
    return isinstance(w, dict) and "layers" in w and "embed" in w


def serves_adapters(w) -> bool:
    """Does the inference layout hold stacked LoRA adapters (a forward then needs each row's `adapter_ids`)?"""
    return is_prepared(w) and any(".lora_A." in k for k in w["layers"][0])


def param_bytes(w) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(w))


# ---- a block ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ctx:
    """What every layer of one forward pass shares."""

    backend: Backend
    cos: jax.Array
    sin: jax.Array
    positions: jax.Array
    segment_ids: jax.Array | None
    step: Pass | None  # how this pass meets the cache; None without one


def decoder_layer(x, p, cfg: ModelConfig, ctx: Ctx, cache=None):
    """One pre-norm block: attention then MLP, each added to the residual. Returns (x, updated cache)."""
    h, cache = attention_block(x, p, cfg, ctx, cache)
    x = x + h
    return x + mlp_block(x, p, cfg), cache


# ---- the model ---------------------------------------------------------------------------------
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def forward(
    params: dict,
    tokens,
    cfg: ModelConfig,
    *,
    backend: Backend | None = None,
    positions=None,
    segment_ids=None,
    cache=None,
    rows=None,
    attend_cache: bool = True,
    kv_len: int | None = None,
    rope_len=None,
    logits_at=None,
    adapter_ids=None,
    attn_impl: str | None = None,
    remat: str = "none",
    compute_dtype=None,
    return_hidden: bool = False,
    scan_unroll: int | bool | None = None,
):
    """tokens [B, S] int32 -> logits [B, S, V] (or final hidden states [B, S, D]).

    params: flat HF-named params (training: joined and cast inside the traced step), or the
        inference layout from `prepare`.
    backend: `smedjan.backend.Backend` (default: `settings()` of jax's default backend);
        attn_impl / scan_unroll override its fields.
    positions: absolute positions [B, S] (default 0..S-1).
    cache: per-layer state from `cache.init_cache`; when given, returns (out, new_cache).
        rows: the cache row of each batch row [B] (default: row b); attend_cache False: the block
        attends over itself only (a prefill into empty rows); kv_len: static cap on the slots read.
    rope_len: the sequence length dynamic-NTK RoPE scales for (default: max position + 1).
    logits_at: [B] index of one token per row: only its logits (or hidden state) are returned, [B, V].
    adapter_ids: [B] each row's adapter when the params hold several stacked (`lora.stack`; 0: the base).
    compute_dtype: cast weights and activations to this dtype (e.g. bf16 over fp32 master weights).
    scan_unroll: `lax.scan`'s unroll of the layer loop (True: fully unrolled, one copy per layer).
    """
    if backend is None:
        backend = settings()
    if attn_impl not in (None, "auto"):
        backend = backend.replace(attn_impl=attn_impl)
    b, s = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if is_prepared(params):
        embed, norm, layers = params["embed"], params["norm"], params["layers"]
        dtype = compute_dtype or embed.dtype
    else:
        embed, norm = params["model.embed_tokens.weight"], params["model.norm.weight"]
        dtype = compute_dtype or embed.dtype
        layers = prepare_layers(layer_params(params), cfg, backend, dtype)
    x = jnp.take(embed, tokens, axis=0).astype(dtype)
    cos, sin = rope_cos_sin(cfg, positions, seq_len=jnp.max(positions) + 1 if rope_len is None else rope_len)
    step = None
    if cache is not None:
        step = Pass.make(positions, rows, attend_cache, kv_len)
        # Materialise cos/sin once: left alone, XLA re-derives them from the positions inside every layer.
        cos, sin = jax.lax.optimization_barrier((cos.astype(dtype), sin.astype(dtype)))
    ctx = Ctx(backend, cos, sin, positions, segment_ids, step)

    if cache is not None or isinstance(layers, (list, tuple)) or adapter_ids is not None:
        # One python-level layer after another: each layer's cache is its own buffer, updated in place.
        per_layer = layers if isinstance(layers, (list, tuple)) else _unstack(layers, cfg.num_hidden_layers)
        new_cache = []
        for i, p in enumerate(per_layer):
            if adapter_ids is not None:
                p = dict(p, **{lora.ROWS: adapter_ids})
            x, c = decoder_layer(x, p, cfg, ctx, None if cache is None else cache[i])
            new_cache.append(c)
        new_cache = tuple(new_cache)
    else:

        def body(x, p):
            return decoder_layer(x, p, cfg, ctx)[0], None

        if remat != "none":
            if remat not in REMAT_POLICIES:
                raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {remat!r}")
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
        unroll = backend.scan_unroll if scan_unroll is None else scan_unroll
        x, _ = jax.lax.scan(body, x, layers, unroll=unroll)
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]
    x = rms_norm(x, norm, cfg.rms_norm_eps)
    if return_hidden:
        out = x
    else:
        head = params["head"] if is_prepared(params) else lm_head(params, cfg)
        out = linear(x, head)
    return out if cache is None else (out, new_cache)


def _unstack(layers: dict, n: int) -> list[dict]:
    return [{k: v[i] for k, v in layers.items()} for i in range(n)]


@partial(jax.jit, static_argnames=("cfg", "backend"))
def logits_fn(params, tokens, cfg: ModelConfig, backend: Backend | None = None):
    return forward(params, tokens, cfg, backend=backend)

"""Text generation: prefill + decode over a preallocated KV cache, all jit-compiled.

Layout of the engine:

* `prepare_params` turns the flat HF-named params into a decode-friendly form once:
  one dict per layer (no per-step slicing of stacked weights), q/k/v and gate/up fused
  into single matrices (one GEMV instead of three / two) with the RMSNorm weight in
  front of each folded in, everything cast to the compute dtype up front.
* The KV cache is a tuple of per-layer (k, v) buffers [B, T, Hkv, D] ("slots": row b
  belongs to one sequence). The decode step is a python-unrolled layer loop, so each
  layer's cache is its own buffer, updated in place by a scatter (buffers donated):
  a step reads the weights once and the cache only up to `kv_len`, and copies
  nothing.
* `DecodeState` lives on the device: caches, last token and position per slot,
  per-slot sampling parameters, generated-token counts (for penalties). Prefill and
  decode steps are pure functions state -> state, so a scheduler can drive them one
  step at a time (continuous batching, smedjan.serve.engine), and `generate` runs
  the whole decode loop on the device in one `lax.while_loop` over fixed-length chunks of
  steps (one early-exit check per chunk, not a host round trip per token).
* Sampling is per row (each slot carries its own temperature, top-k, top-p, min-p,
  penalties and seed), so requests with different settings share one batch without
  recompiles (`generate` alone, which knows all its rows up front, compiles a loop
  specialised to them: no sampling branch for greedy rows). A row's random draw is a hash
  of (seed, position): a request's samples do not depend on what else is in the batch.

Compiles are bounded: prompts are padded to power-of-two buckets, and the decode
step is specialised on a power-of-two `kv_len` (how much of the cache it reads).
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from smedjan.config import ModelConfig
from smedjan.errors import UserError
from smedjan.model.attention import attention
from smedjan.model.rope import apply_rope, rope_cos_sin
from smedjan.model.transformer import layer_params, linear, lm_head, rms_norm

# Donation is a no-op on some backends (CPU with some jax versions); the warning is noise.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

MAX_TOP_LOGPROBS = 20
MIN_BUCKET = 16


def next_bucket(n: int, cap: int | None = None, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= n (at least `minimum`), capped at `cap`."""
    b = max(minimum, 1 << max(0, int(n - 1).bit_length()))
    return min(b, cap) if cap is not None else b


# ---- sampling parameters ---------------------------------------------------------------------
@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0 (or -1): off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt + generated tokens
    presence_penalty: float = 0.0  # OpenAI style, over generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False

    def validate(self) -> SamplingParams:
        """Raise ValueError(param_name, message) for out-of-range values."""

        def bad(name, msg):
            raise ValueError(name, msg)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_tokens", f"max_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", f"temperature must be in [0, 100], got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", f"top_k must be an integer >= -1 (-1 or 0: off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            bad("repetition_penalty", f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", f"seed must be an integer, got {self.seed!r}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            bad("top_logprobs", f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        return self

    def row(self, seed: int) -> dict:
        return {
            "temperature": float(self.temperature),
            "top_k": int(max(self.top_k, 0)),
            "top_p": float(self.top_p),
            "min_p": float(self.min_p),
            "repetition_penalty": float(self.repetition_penalty),
            "presence_penalty": float(self.presence_penalty),
            "frequency_penalty": float(self.frequency_penalty),
            "seed": int(seed) & 0xFFFFFFFF,
        }


_SAMP_DTYPES = {
    "temperature": np.float32,
    "top_k": np.int32,
    "top_p": np.float32,
    "min_p": np.float32,
    "repetition_penalty": np.float32,
    "presence_penalty": np.float32,
    "frequency_penalty": np.float32,
    "seed": np.uint32,
}


def _samp_arrays(rows: list[dict]) -> dict:
    return {k: np.asarray([r[k] for r in rows], dt) for k, dt in _SAMP_DTYPES.items()}


# ---- parameters ----------------------------------------------------------------------------------
def prepare_params(params: dict, cfg: ModelConfig, dtype=None) -> dict:
    """Flat HF-named params -> {"embed", "head", "norm", "layers": [per-layer dict]} in `dtype`."""
    if "layers" in params and "embed" in params:
        return params  # already prepared
    embed = params["model.embed_tokens.weight"]
    dtype = jnp.dtype(dtype or embed.dtype)
    lp = layer_params(params)
    layers = []
    for i in range(cfg.num_hidden_layers):

        def g(name, i=i):
            return lp[name][i].astype(dtype)

        def normed(names, norm, i=i):
            # The RMSNorm weight folded into the matrix that consumes the norm's output (in float32,
            # rounded once): the step then scales the matmul's output by the norm's 1/rms and never
            # materialises the normalised vector (one small kernel less per norm, per layer).
            ln = lp[norm][i].astype(jnp.float32)
            return jnp.concatenate([lp[n][i].astype(jnp.float32) * ln for n in names], axis=0).astype(dtype)

        layer = {
            "qkv": normed(
                ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
                "input_layernorm.weight",
            ),
            "o": g("self_attn.o_proj.weight"),
            "gate_up": normed(["mlp.gate_proj.weight", "mlp.up_proj.weight"], "post_attention_layernorm.weight"),
            "down": g("mlp.down_proj.weight"),
        }
        if cfg.qkv_bias:
            layer["qkv_b"] = jnp.concatenate(
                [g("self_attn.q_proj.bias"), g("self_attn.k_proj.bias"), g("self_attn.v_proj.bias")], axis=0
            )
        if cfg.o_bias:
            layer["o_b"] = g("self_attn.o_proj.bias")
        if cfg.qk_norm:
            layer["q_norm"] = g("self_attn.q_norm.weight")
            layer["k_norm"] = g("self_attn.k_norm.weight")
        layers.append(layer)
    e = embed.astype(dtype)
    head = e if cfg.tie_word_embeddings else lm_head(params, cfg).astype(dtype)
    return {"embed": e, "head": head, "norm": params["model.norm.weight"].astype(dtype), "layers": layers}


def param_bytes(w: dict) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(w))


# ---- the model, decode-shaped -----------------------------------------------------------------------
def _normed_linear(x, w, eps, b=None):
    """rms_norm(x, ln) · wᵀ (+ b) for a `w` with the norm weight `ln` folded in (`prepare_params`):
    the 1/rms factor is applied to the float32 matmul output. (Scaling the input instead measured
    the same on the H100 at batch 1: small, 125m and 1b within run-to-run spread.)"""
    xf = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    y = jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32) * inv_rms
    y = y.astype(x.dtype)
    return y if b is None else y + b.astype(x.dtype)


def _qkv(x, p, cfg: ModelConfig, cos, sin):
    """The attention input norm, the fused q/k/v projection, qk-norm and RoPE."""
    b, s, _ = x.shape
    hd, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    qkv = _normed_linear(x, p["qkv"], cfg.rms_norm_eps, p.get("qkv_b"))
    q, k, v = jnp.split(qkv, [hq * hd, (hq + hkv) * hd], axis=-1)
    q, k, v = q.reshape(b, s, hq, hd), k.reshape(b, s, hkv, hd), v.reshape(b, s, hkv, hd)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _finish_layer(x, attn_out, p, cfg):
    b, s = attn_out.shape[:2]
    x = x + linear(attn_out.reshape(b, s, -1), p["o"], p.get("o_b"))
    gu = _normed_linear(x, p["gate_up"], cfg.rms_norm_eps)
    f = cfg.intermediate_size
    return x + linear(jax.nn.silu(gu[..., :f]) * gu[..., f:], p["down"])


def _decode_forward(w, cfg: ModelConfig, caches, tokens, pos, active, kv_len: int, impl: str):
    """One token per slot. tokens/pos/active [B]; returns (fp32 logits [B, V], new caches)."""
    b = tokens.shape[0]
    x = jnp.take(w["embed"], tokens, axis=0)[:, None]
    q_pos = pos[:, None]
    cos, sin = rope_cos_sin(cfg, q_pos, seq_len=jnp.max(jnp.where(active, pos, 0)) + 1)
    # Materialise cos/sin once: left alone, XLA re-derives them from `pos` inside every layer.
    cos, sin = jax.lax.optimization_barrier((cos.astype(x.dtype), sin.astype(x.dtype)))
    rows = jnp.arange(b)[:, None]
    hd, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    fused = impl == "pallas_fused"
    if fused:
        from pallas_kernels.decode_layer_attention import decode_layer_attention, supported

        fused = not cfg.qk_norm and supported(hq, hkv, hd)
        impl = "pallas"  # qk-norm, or a shape the fused kernel does not take: the split-K kernel
    new_caches = []
    for p, (ck, cv) in zip(w["layers"], caches):
        if fused:
            # One Pallas kernel after the qkv GEMV: rope, both cache writes (in place) and the
            # attention of the new token (pallas_kernels/decode_layer_attention.py).
            qkv = _normed_linear(x, p["qkv"], cfg.rms_norm_eps, p.get("qkv_b"))
            out, ck, cv = decode_layer_attention(
                qkv.reshape(b, -1),
                cos.reshape(b, hd),
                sin.reshape(b, hd),
                pos,
                ck,
                cv,
                num_heads=hq,
                num_kv_heads=hkv,
                head_dim=hd,
                sliding_window=cfg.sliding_window,
                kv_len=kv_len,
            )
        else:
            q, k, v = _qkv(x, p, cfg, cos, sin)
            if b == 1:
                # A plain dynamic-update-slice: XLA turns the general scatter into read-old / select /
                # write to keep out-of-bounds writes dropped (two more kernels per k and v per layer on
                # the latency-bound batch-1 path). Active rows always write inside the cache; a finished
                # row at the very end is clamped onto its own last slot, whose contents no longer matter.
                ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, pos[0], 0, 0))
                cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, pos[0], 0, 0))
            else:
                ck = ck.at[rows, q_pos].set(k.astype(ck.dtype), mode="drop")
                cv = cv.at[rows, q_pos].set(v.astype(cv.dtype), mode="drop")
            if impl == "pallas":  # the kernel skips blocks past each row's position by itself
                kk, vv = ck, cv
            else:
                kk, vv = ck[:, :kv_len], cv[:, :kv_len]
            kv_pos = jnp.broadcast_to(jnp.arange(kk.shape[1], dtype=jnp.int32), (b, kk.shape[1]))
            out = attention(
                q,
                kk.astype(q.dtype),
                vv.astype(q.dtype),
                q_pos=q_pos,
                kv_pos=kv_pos,
                sliding_window=cfg.sliding_window,
                impl=impl,
                decoding=True,
            )
        x = _finish_layer(x, out.reshape(b, 1, -1), p, cfg)
        new_caches.append((ck, cv))
    x = rms_norm(x[:, 0], w["norm"], cfg.rms_norm_eps)
    return linear(x, w["head"]).astype(jnp.float32), tuple(new_caches)


def _prefill_forward(w, cfg: ModelConfig, caches, tokens, lens, slots, impl: str):
    """Prompts [N, S] (right-padded, lengths `lens`) written into cache rows `slots`.

    Attention runs over the prompt itself (causal), not the cache; k/v are then
    scattered into the slots. Returns (fp32 logits at each prompt's last token [N, V], caches).
    """
    n, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (n, s))
    x = jnp.take(w["embed"], tokens, axis=0)
    cos, sin = rope_cos_sin(cfg, positions, seq_len=jnp.max(lens))
    # Off GPU the Pallas kernels only interpret: far too slow for serving, so prefill in XLA there.
    impl = "auto" if impl == "pallas_fused" else impl  # the fused kernel is decode-only: prefill as the model's auto
    prefill_impl = "xla" if impl == "pallas" and jax.default_backend() != "gpu" else impl
    new_caches = []
    for p, (ck, cv) in zip(w["layers"], caches):
        q, k, v = _qkv(x, p, cfg, cos, sin)
        ck = ck.at[slots[:, None], positions].set(k.astype(ck.dtype), mode="drop")
        cv = cv.at[slots[:, None], positions].set(v.astype(cv.dtype), mode="drop")
        out = attention(
            q, k, v, q_pos=positions, kv_pos=positions, sliding_window=cfg.sliding_window, impl=prefill_impl
        )
        x = _finish_layer(x, out, p, cfg)
        new_caches.append((ck, cv))
    last = jnp.take_along_axis(x, (lens - 1)[:, None, None], axis=1)[:, 0]
    last = rms_norm(last, w["norm"], cfg.rms_norm_eps)
    return linear(last, w["head"]).astype(jnp.float32), tuple(new_caches)


# ---- sampling --------------------------------------------------------------------------------------
def _penalize(logits, samp, counts, prompt_mask):
    rp = samp["repetition_penalty"][:, None]
    seen = (counts > 0) | prompt_mask
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    return logits - samp["frequency_penalty"][:, None] * counts - samp["presence_penalty"][:, None] * (counts > 0)


def _mix32(x):
    """murmur3's 32-bit finaliser: a bijective avalanche hash on uint32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _uniform(seed, pos):
    """A uniform in [0, 1) per row from (seed, position)."""
    h = _mix32(
        _mix32(seed.astype(jnp.uint32) ^ jnp.uint32(0x9E3779B9)) + pos.astype(jnp.uint32) * jnp.uint32(0x632BE5AB)
    )
    h = _mix32(h)
    return (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def _sample_rows(logits, samp, key_pos):
    """Temperature, then top-k, top-p (renormalised after top-k), min-p; one categorical draw per row."""
    v = logits.shape[-1]
    temp = jnp.where(samp["temperature"] > 0, samp["temperature"], 1.0)
    sorted_l, idx = jax.lax.top_k(logits / temp[:, None], v)
    ranks = jnp.arange(v)[None]
    neg = jnp.finfo(jnp.float32).min
    k = samp["top_k"][:, None]
    sorted_l = jnp.where((k > 0) & (ranks >= k), neg, sorted_l)
    probs = jax.nn.softmax(sorted_l, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    drop = (before >= samp["top_p"][:, None]) | (probs < samp["min_p"][:, None] * probs[:, :1])
    sorted_l = jnp.where(drop & (ranks > 0), neg, sorted_l)

    # Inverse-CDF draw from one uniform per row, u = hash(seed, position): cheap to compile and
    # to run (threefry per row costs seconds of CPU compile), and independent of the batch.
    probs = jax.nn.softmax(sorted_l, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = _uniform(samp["seed"], key_pos) * cdf[:, -1]
    kept = jnp.sum(sorted_l > neg, axis=-1)
    choice = jnp.minimum(jnp.sum(cdf <= u[:, None], axis=-1), kept - 1)
    return jnp.take_along_axis(idx, choice[:, None], axis=1)[:, 0].astype(jnp.int32)


def sampling_mode(rows: list[dict]) -> tuple[bool, bool]:
    """(does any row sample, does any row use a penalty) for `rows` of `SamplingParams.row`: the
    host knows this, so the jitted steps can be specialised to it (`_sample`'s `mode`)."""
    sampled = any(r["temperature"] > 0 for r in rows)
    penalized = any(
        r["repetition_penalty"] != 1.0 or r["presence_penalty"] != 0.0 or r["frequency_penalty"] != 0.0 for r in rows
    )
    return sampled, penalized


def _sample(logits, samp, counts, prompt_mask, key_pos, top_n: int, mode: tuple[bool, bool] | None = None):
    """logits fp32 [B, V] -> dict(tok [B], logprob [B], and top_ids/top_logprobs [B, top_n] if top_n).

    mode: None decides on the device whether any row samples or uses a penalty (`lax.cond`);
    a static (sampled, penalized) pair from `sampling_mode` leaves the branches not taken out of
    the program. A conditional inside the decode loop costs a device-to-host round trip per
    token on GPU, a large part of a small model's step.
    """
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    if mode is None:
        any_pen = (
            jnp.any(samp["repetition_penalty"] != 1.0)
            | jnp.any(samp["presence_penalty"] != 0.0)
            | jnp.any(samp["frequency_penalty"] != 0.0)
        )
        logits = jax.lax.cond(any_pen, lambda l: _penalize(l, samp, counts, prompt_mask), lambda l: l, logits)
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tok = jax.lax.cond(
            jnp.all(samp["temperature"] <= 0),
            lambda l: greedy,
            lambda l: jnp.where(samp["temperature"] > 0, _sample_rows(l, samp, key_pos), greedy),
            logits,
        )
    else:
        sampled, penalized = mode
        if penalized:
            logits = _penalize(logits, samp, counts, prompt_mask)
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if sampled:
            tok = jnp.where(samp["temperature"] > 0, _sample_rows(logits, samp, key_pos), tok)
    out = {"tok": tok, "logprob": jnp.take_along_axis(logprobs, tok[:, None], axis=1)[:, 0]}
    if top_n:
        out["top_logprobs"], out["top_ids"] = jax.lax.top_k(logprobs, top_n)
    return out


# ---- device state + jitted steps --------------------------------------------------------------------
def init_state(cfg: ModelConfig, batch: int, max_len: int, dtype) -> dict:
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    caches = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_hidden_layers))
    return {
        "caches": caches,
        "tok": jnp.zeros((batch,), jnp.int32),
        "pos": jnp.zeros((batch,), jnp.int32),
        "counts": jnp.zeros((batch, cfg.vocab_size), jnp.int32),
        "prompt_mask": jnp.zeros((batch, cfg.vocab_size), jnp.bool_),
        "samp": {
            k: jnp.asarray(np.full((batch,), 1.0 if k in ("top_p", "repetition_penalty") else 0, dt))
            for k, dt in _SAMP_DTYPES.items()
        },
    }


def _step_core(w, state, active, cfg, kv_len, impl, top_n, sampling):
    logits, caches = _decode_forward(w, cfg, state["caches"], state["tok"], state["pos"], active, kv_len, impl)
    out = _sample(logits, state["samp"], state["counts"], state["prompt_mask"], state["pos"], top_n, sampling)
    b = logits.shape[0]
    tok = jnp.where(active, out["tok"], state["tok"])
    new = dict(
        state,
        caches=caches,
        tok=tok,
        pos=jnp.where(active, state["pos"] + 1, state["pos"]),
        counts=state["counts"].at[jnp.arange(b), tok].add(active.astype(jnp.int32)),
    )
    return new, out


@partial(jax.jit, static_argnames=("cfg", "kv_len", "impl", "top_n", "n_steps"), donate_argnames=("state",))
def decode_steps(w, state, active, cfg: ModelConfig, kv_len: int, impl: str = "xla", top_n: int = 0, n_steps: int = 1):
    """`n_steps` decode steps for every slot in one dispatch; outputs are stacked [n_steps, B, ...].

    Inactive slots neither advance nor count. The count is fixed (no early exit): a row that
    stops inside the chunk keeps decoding until its end and the caller drops those tokens.
    Several steps per dispatch amortise the host cost of a dispatch, which at batch 64 on an
    H100 is larger than the GPU work of one step. Sampling is decided on the device (`_sample`'s
    mode None): a server's rows change, and a specialised program per mix would compile mid-stream.
    """
    return jax.lax.scan(
        lambda st, _: _step_core(w, st, active, cfg, kv_len, impl, top_n, None), state, None, length=n_steps
    )


@partial(jax.jit, static_argnames=("cfg", "impl", "top_n"), donate_argnames=("state",))
def prefill_step(w, state, tokens, lens, slots, samp, cfg: ModelConfig, impl: str = "xla", top_n: int = 0):
    """Prefill prompts [N, S] into `slots` and sample each one's first token with its `samp` row."""
    n, s = tokens.shape
    v = cfg.vocab_size
    logits, caches = _prefill_forward(w, cfg, state["caches"], tokens, lens, slots, impl)
    valid = jnp.arange(s)[None] < lens[:, None]
    pm = jnp.zeros((n, v), jnp.bool_).at[jnp.arange(n)[:, None], jnp.where(valid, tokens, v)].set(True, mode="drop")
    counts = jnp.zeros((n, v), jnp.int32)
    out = _sample(logits, samp, counts, pm, lens - 1, top_n)
    counts = counts.at[jnp.arange(n), out["tok"]].add(1)
    new = dict(
        state,
        caches=caches,
        tok=state["tok"].at[slots].set(out["tok"]),
        pos=state["pos"].at[slots].set(lens),
        counts=state["counts"].at[slots].set(counts),
        prompt_mask=state["prompt_mask"].at[slots].set(pm),
        samp={k: state["samp"][k].at[slots].set(samp[k]) for k in state["samp"]},
    )
    return new, out


def _loop_chunk() -> int:
    """Decode steps per early-exit check in `decode_loop`: 16 on GPU, where every while-loop
    iteration copies its condition to the host; 1 elsewhere, where that costs nothing and a chunk's
    steps after every row has stopped (up to 15) would be pure waste on a slow CPU step."""
    return 16 if jax.default_backend() == "gpu" else 1


@partial(
    jax.jit,
    static_argnames=("cfg", "n_steps", "kv_len", "impl", "top_n", "sampling", "chunk"),
    donate_argnames=("state",),
)
def decode_loop(
    w,
    state,
    first,
    active,
    stop_ids,
    cfg: ModelConfig,
    n_steps: int,
    kv_len: int,
    impl: str = "xla",
    top_n: int = 0,
    sampling: tuple[bool, bool] | None = None,
    chunk: int | None = None,
):
    """Up to `n_steps` decode steps on the device; stops early once every row is done.

    first: the prefill's output dict; stop_ids [K] int32 (-1 padded). Returns (state, tokens [B, n_steps+1],
    logprobs [B, n_steps+1], top (or None), steps taken); rows are -1 after their stop token.

    The steps run `chunk` at a time (default `_loop_chunk()`) as a fixed-length scan, and the loop
    checks for early exit between chunks: on GPU a while loop copies its condition to the host every
    iteration, which for a small model costs as much as the step itself. A row past its stop token,
    or a step past `n_steps`, is inactive (writes nothing, does not advance); the results equal one
    step at a time. `sampling`: see `_sample`'s `mode`.
    """
    b = first["tok"].shape[0]
    c = max(1, min(chunk or _loop_chunk(), n_steps))
    width = n_steps + c  # room for the columns the last chunk runs past n_steps (dropped below)
    toks = jnp.full((b, width), -1, jnp.int32).at[:, 0].set(first["tok"])
    lps = jnp.zeros((b, width), jnp.float32).at[:, 0].set(first["logprob"])
    tops = None
    if top_n:
        tops = (
            jnp.zeros((b, width, top_n), jnp.float32).at[:, 0].set(first["top_logprobs"]),
            jnp.zeros((b, width, top_n), jnp.int32).at[:, 0].set(first["top_ids"]),
        )
    done = ~active | jnp.isin(first["tok"], stop_ids)

    def step(carry, _):
        state, i, toks, lps, tops, done = carry
        live = ~done & (i <= n_steps)
        state, out = _step_core(w, state, live, cfg, kv_len, impl, top_n, sampling)
        toks = toks.at[:, i].set(jnp.where(live, out["tok"], -1))
        lps = lps.at[:, i].set(out["logprob"])
        if top_n:
            tops = (tops[0].at[:, i].set(out["top_logprobs"]), tops[1].at[:, i].set(out["top_ids"]))
        done = done | (live & jnp.isin(out["tok"], stop_ids))
        return (state, i + 1, toks, lps, tops, done), None

    def cond(carry):
        return (carry[1] <= n_steps) & ~jnp.all(carry[5])

    def body(carry):
        return jax.lax.scan(step, carry, None, length=c)[0]

    state, _, toks, lps, tops, _ = jax.lax.while_loop(cond, body, (state, 1, toks, lps, tops, done))
    keep = n_steps + 1
    toks, lps = toks[:, :keep], lps[:, :keep]
    if top_n:
        tops = (tops[0][:, :keep], tops[1][:, :keep])
    steps = jnp.max(jnp.sum(toks >= 0, axis=1))  # columns up to the last row's stop token (or all)
    return state, toks, lps, tops, steps


# ---- a host-side runner over the state (used by generate, the server and the benchmark) -------------
DECODE_IMPLS = ("auto", "xla", "cudnn", "pallas", "pallas_fused")


def resolve_decode_impl(impl: str) -> str:
    """'auto': the fused Pallas decode-layer kernel on GPU (1b batch-1 on the H100: 72% of the
    bandwidth bound against 66% for XLA, benchmarks/RESULTS.md), XLA elsewhere."""
    if impl not in DECODE_IMPLS:
        raise ValueError(f"attention impl must be one of {DECODE_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas_fused" if jax.default_backend() == "gpu" else "xla"
    return impl


class Runner:
    """Owns the device state of B slots × T positions and the compiled steps."""

    def __init__(
        self,
        params: dict,
        cfg: ModelConfig,
        max_batch: int,
        max_seq_len: int,
        dtype=None,
        attn_impl: str = "auto",
        cache_dtype=None,
        min_kv_bucket: int = MIN_BUCKET,
    ):
        self.cfg = cfg
        self.min_kv_bucket = min_kv_bucket
        self.w = prepare_params(params, cfg, dtype)
        self.dtype = self.w["embed"].dtype
        self.cache_dtype = jnp.dtype(cache_dtype or self.dtype)
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.attn_impl = resolve_decode_impl(attn_impl)
        self.state = init_state(cfg, max_batch, max_seq_len, self.cache_dtype)
        self.pos = np.zeros(max_batch, np.int64)  # host mirror of state["pos"]

    def reset(self):
        self.state = init_state(self.cfg, self.max_batch, self.max_seq_len, self.cache_dtype)
        self.pos[:] = 0

    def prefill(
        self,
        slots: list[int],
        prompts: list[list[int]],
        samp_rows: list[dict],
        top_n: int = 0,
        bucket: int | None = None,
    ) -> dict:
        n = len(prompts)
        lens = [len(p) for p in prompts]
        if min(lens) < 1 or max(lens) > self.max_seq_len:
            raise ValueError(f"prompt lengths must be in [1, {self.max_seq_len}], got {lens}")
        s = bucket or next_bucket(max(lens), self.max_seq_len)
        tokens = np.zeros((n, s), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        self.state, out = prefill_step(
            self.w,
            self.state,
            tokens,
            np.asarray(lens, np.int32),
            np.asarray(slots, np.int32),
            _samp_arrays(samp_rows),
            cfg=self.cfg,
            impl=self.attn_impl,
            top_n=top_n,
        )
        self.pos[np.asarray(slots)] = lens
        return out

    def kv_len_for(self, active: np.ndarray, n_steps: int = 1) -> int:
        maxpos = int(self.pos[active].max()) if active.any() else 0
        return next_bucket(maxpos + n_steps, self.max_seq_len, self.min_kv_bucket)

    def step(self, active: np.ndarray, top_n: int = 0, n_steps: int = 1) -> dict:
        """`n_steps` decode steps (async: returns device arrays stacked [n_steps, B, ...])."""
        kv_len = self.kv_len_for(active, n_steps)
        self.state, out = decode_steps(
            self.w,
            self.state,
            jnp.asarray(active),
            cfg=self.cfg,
            kv_len=kv_len,
            impl=self.attn_impl,
            top_n=top_n,
            n_steps=n_steps,
        )
        self.pos[active] += n_steps
        return out


# ---- the public batch API ------------------------------------------------------------------------
_PREPARED: dict = {}


def _prepared(params, cfg, dtype):
    if "layers" in params and "embed" in params:
        return params
    key = (id(params), cfg, None if dtype is None else jnp.dtype(dtype).name)
    hit = _PREPARED.get(key)
    if hit is not None and hit[0] is params:
        return hit[1]
    w = prepare_params(params, cfg, dtype)
    _PREPARED.clear()  # one model at a time: keep device memory bounded
    _PREPARED[key] = (params, w)
    return w


def _eos_list(eos_id) -> list[int]:
    if eos_id is None:
        return []
    if isinstance(eos_id, (list, tuple, set)):
        return [int(e) for e in eos_id]
    return [int(eos_id)]


def generate(
    params,
    cfg: ModelConfig,
    prompt_ids: list[list[int]],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int = 0,
    eos_id=None,
    *,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    stop_token_ids=None,
    stop_strings=None,
    tokenizer=None,
    dtype=None,
    attn_impl: str = "auto",
    return_logprobs: bool = False,
    max_seq_len: int | None = None,
):
    """Generate for a batch of prompts; returns the new tokens of each (stop token excluded).

    The decode loop runs on the device. Row i samples with seed `seed + i`, so rows of a
    batch differ while a run stays reproducible. `stop_strings` (needs `tokenizer`) cut a
    row's tokens before the token that completes the stop string. With
    `return_logprobs=True` returns (tokens, logprobs) lists.
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    sp = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
    )
    try:
        sp.validate()
    except ValueError as e:
        raise ValueError(e.args[-1]) from None
    w = _prepared(params, cfg, dtype)
    b = len(prompt_ids)
    longest = max(len(p) for p in prompt_ids)
    t = max_seq_len or next_bucket(longest + max_new_tokens, minimum=64)
    if longest >= t:
        raise ValueError(f"prompt of {longest} tokens does not fit max_seq_len {t}")
    runner = Runner(w, cfg, b, t, attn_impl=attn_impl)
    rows = [sp.row(seed + i) for i in range(b)]
    first = runner.prefill(list(range(b)), [list(p) for p in prompt_ids], rows)
    stops = sorted(set(_eos_list(eos_id) + list(stop_token_ids or [])))
    stop_arr = jnp.asarray(stops or [-1], jnp.int32)
    n_steps = max_new_tokens - 1
    kv_len = next_bucket(longest + max_new_tokens, t)
    runner.state, toks, lps, _, _ = decode_loop(
        w,
        runner.state,
        first,
        jnp.ones((b,), jnp.bool_),
        stop_arr,
        cfg=cfg,
        n_steps=n_steps,
        kv_len=kv_len,
        impl=runner.attn_impl,
        sampling=sampling_mode(rows),
    )
    toks, lps = np.asarray(toks), np.asarray(lps)
    out_t, out_l = [], []
    for i in range(b):
        # Room left in the cache bounds a row too (prompts shorter than the longest have more).
        row, lrow = [], []
        for j in range(max_new_tokens):
            tok = int(toks[i, j])
            if tok < 0 or tok in stops:
                break
            row.append(tok)
            lrow.append(float(lps[i, j]))
        if stop_strings:
            if tokenizer is None:
                raise ValueError("stop_strings need a tokenizer")
            cut = _stop_string_cut(tokenizer, row, stop_strings)
            row, lrow = row[:cut], lrow[:cut]
        out_t.append(row)
        out_l.append(lrow)
    return (out_t, out_l) if return_logprobs else out_t


def _stop_string_cut(tokenizer, ids: list[int], stops) -> int:
    for k in range(1, len(ids) + 1):
        text = decode_text(tokenizer, ids[:k])
        if any(s and s in text for s in stops):
            return k - 1
    return len(ids)


# ---- incremental detokenisation with stop strings (shared by the server and chat) ----------------
class TextStream:
    """Token ids in, text deltas out: holds back incomplete UTF-8 and possible stop-string prefixes."""

    def __init__(self, tokenizer, stops=(), prompt_tail: list[int] | None = None):
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.ids = list(prompt_tail or [])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all generated text so far
        self.emitted = 0
        self.stopped = False

    def _decode_delta(self) -> str:
        prefix = decode_text(self.tok, self.ids[self.prefix_offset : self.read_offset])
        full = decode_text(self.tok, self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def add(self, token_id: int) -> str:
        """Feed one token; returns the text now safe to emit. Sets `stopped` on a stop string."""
        self.ids.append(int(token_id))
        self.text += self._decode_delta()
        if self.stops:
            start = max(0, self.emitted - max(len(s) for s in self.stops))
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                end = min(hits)
                self.text = self.text[:end]
                self.stopped = True
                return self._emit(end)
            hold = 0
            for s in self.stops:
                for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
            return self._emit(len(self.text) - hold)
        return self._emit(len(self.text))

    def flush(self) -> str:
        """At the end: whatever was held back (a partial stop string, or dangling bytes)."""
        if not self.stopped:
            full = decode_text(self.tok, self.ids[self.prefix_offset :])
            prefix = decode_text(self.tok, self.ids[self.prefix_offset : self.read_offset])
            if len(full) > len(prefix):
                self.text += full[len(prefix) :]
                self.prefix_offset = self.read_offset = len(self.ids)
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta


# ---- tokenizer loading --------------------------------------------------------------------------
def load_tokenizer(folder):
    """smedjan.tokenizer.Tokenizer for a folder holding tokenizer.json (+ tokenizer_config.json)."""
    from smedjan.tokenizer import Tokenizer

    return Tokenizer.from_dir(folder)


def decode_text(tokenizer, ids) -> str:
    """User-facing text: special tokens skipped."""
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except TypeError:  # a tokenizer without the keyword
        return tokenizer.decode(ids)


def stop_ids_for(folder, cfg: ModelConfig, tokenizer) -> list[int]:
    """End-of-sequence ids: config.json, generation_config.json and the tokenizer's eos, merged."""
    ids = set(_eos_list(cfg.eos_token_id))
    gen = Path(folder) / "generation_config.json"
    if gen.is_file():
        try:
            ids.update(_eos_list(json.loads(gen.read_text()).get("eos_token_id")))
        except (json.JSONDecodeError, TypeError, ValueError):
            pass
    if tokenizer is not None:
        ids.update(getattr(tokenizer, "stop_ids", None) or [])
        if getattr(tokenizer, "eos_id", None) is not None:
            ids.add(int(tokenizer.eos_id))
    return sorted(i for i in ids if 0 <= i < cfg.vocab_size)


def load_model(model: str, dtype=None):
    """(folder, cfg, params, tokenizer) for a checkpoint folder or hub id."""
    from smedjan.checkpoint import load_hf, resolve_path

    folder = resolve_path(model)
    cfg, params = load_hf(folder, dtype=dtype)
    tokenizer = load_tokenizer(folder)
    return folder, cfg, params, tokenizer


# ---- `smedjan generate` ----------------------------------------------------------------------------
def add_sampling_args(p):
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="compute dtype (default: bfloat16 on GPU, float32 on CPU)",
    )


def default_dtype(name: str | None):
    if name:
        return jnp.dtype(name)
    return jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32


def _cmd_generate(args):
    from smedjan.checkpoint import CheckpointError

    try:
        folder, cfg, params, tok = load_model(args.model, dtype=default_dtype(args.dtype))
    except (CheckpointError, FileNotFoundError, OSError) as e:
        raise UserError(str(e)) from None
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        ids = tok.encode(text, add_bos=False)
    else:
        ids = tok.encode(args.prompt, add_bos=not args.no_bos)
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    room = cfg.max_position_embeddings - len(ids)
    if room < 1:
        raise UserError(f"the prompt has {len(ids)} tokens; the model's context is {cfg.max_position_embeddings}")
    try:
        out = generate(
            params,
            cfg,
            [ids],
            max_new_tokens=min(args.max_new_tokens, room),
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            eos_id=stop_ids_for(folder, cfg, tok),
            stop_strings=args.stop or None,
            tokenizer=tok,
        )[0]
    except ValueError as e:
        raise UserError(str(e)) from None
    text = decode_text(tok, out)
    if args.stop:
        for s in args.stop:
            if s in text:
                text = text[: text.index(s)]
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


def register(subparsers):
    p = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint",
        description="Complete a prompt with a checkpoint folder (smedjan or Hugging Face).",
    )
    p.add_argument("model", help="checkpoint folder or hub repo id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    add_sampling_args(p)
    p.set_defaults(func=_cmd_generate)

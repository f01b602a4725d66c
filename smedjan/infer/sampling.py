"""Choosing the next token: per-row sampling parameters and the jitted sampler.

Sampling is per row (each slot carries its own temperature, top-k, top-p, min-p, penalties and
seed), so requests with different settings share one batch without recompiles. A row's random
draw is a hash of (seed, position): a request's samples do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

MAX_TOP_LOGPROBS = 20


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
    speculative: bool = False  # serving: prompt-lookup speculation for this request (greedy output unchanged)

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
        if self.speculative and (self.penalized or self.logprobs or self.top_logprobs):
            bad("speculative", "speculative decoding does not combine with penalties or logprobs")
        return self

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

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


SAMP_DTYPES = {
    "temperature": np.float32,
    "top_k": np.int32,
    "top_p": np.float32,
    "min_p": np.float32,
    "repetition_penalty": np.float32,
    "presence_penalty": np.float32,
    "frequency_penalty": np.float32,
    "seed": np.uint32,
}


def samp_arrays(rows: list[dict]) -> dict:
    return {k: np.asarray([r[k] for r in rows], dt) for k, dt in SAMP_DTYPES.items()}


def penalize(logits, samp, counts, prompt_mask):
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


def uniform(seed, pos):
    """A uniform in [0, 1) per row from (seed, position)."""
    h = _mix32(
        _mix32(seed.astype(jnp.uint32) ^ jnp.uint32(0x9E3779B9)) + pos.astype(jnp.uint32) * jnp.uint32(0x632BE5AB)
    )
    h = _mix32(h)
    return (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def sample_rows(logits, samp, key_pos):
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
    u = uniform(samp["seed"], key_pos) * cdf[:, -1]
    kept = jnp.sum(sorted_l > neg, axis=-1)
    choice = jnp.minimum(jnp.sum(cdf <= u[:, None], axis=-1), kept - 1)
    return jnp.take_along_axis(idx, choice[:, None], axis=1)[:, 0].astype(jnp.int32)


def sampling_mode(rows: list[dict]) -> tuple[bool, bool]:
    """(does any row sample, does any row use a penalty) for `rows` of `SamplingParams.row`: the
    host knows this, so the jitted steps can be specialised to it (`sample`'s `mode`)."""
    sampled = any(r["temperature"] > 0 for r in rows)
    penalized = any(
        r["repetition_penalty"] != 1.0 or r["presence_penalty"] != 0.0 or r["frequency_penalty"] != 0.0 for r in rows
    )
    return sampled, penalized


def sample(logits, samp, counts, prompt_mask, key_pos, top_n: int, mode: tuple[bool, bool] | None = None):
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
        logits = jax.lax.cond(any_pen, lambda l: penalize(l, samp, counts, prompt_mask), lambda l: l, logits)
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tok = jax.lax.cond(
            jnp.all(samp["temperature"] <= 0),
            lambda l: greedy,
            lambda l: jnp.where(samp["temperature"] > 0, sample_rows(l, samp, key_pos), greedy),
            logits,
        )
    else:
        sampled, penalized = mode
        if penalized:
            logits = penalize(logits, samp, counts, prompt_mask)
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if sampled:
            tok = jnp.where(samp["temperature"] > 0, sample_rows(logits, samp, key_pos), tok)
    out = {"tok": tok, "logprob": jnp.take_along_axis(logprobs, tok[:, None], axis=1)[:, 0]}
    if top_n:
        out["top_logprobs"], out["top_ids"] = jax.lax.top_k(logprobs, top_n)
    return out

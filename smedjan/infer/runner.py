"""The decode loop: prefill and decode steps over a preallocated cache, all jit-compiled.

* The weights are the model's inference layout (`model.transformer.prepare`, once at load) and
  every step runs the model's own `forward` with its per-layer cache (`model/cache.py`): a step
  reads the weights once and the cache only up to `kv_len`, and copies nothing (buffers donated).
* The device state (a dict) holds the cache, last token and position per slot ("slot": row b of
  the cache belongs to one sequence), per-slot sampling parameters and generated-token counts (for
  penalties). Prefill and decode steps are pure functions state -> state, so a scheduler can drive
  them one step at a time (continuous batching, `smedjan.serve.engine`), and `generate` runs the
  whole decode loop on the device in one `lax.while_loop` over fixed-length chunks of steps (one
  early-exit check per chunk, not a host round trip per token).
* `Runner` owns one such state and the backend settings, and is what callers hold.

Compiles are bounded: prompts are padded to power-of-two buckets, and the decode step is
specialised on a power-of-two `kv_len` (how much of the cache it reads).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from smedjan.backend import Backend, settings
from smedjan.config import ModelConfig
from smedjan.infer.sampling import SAMP_DTYPES, SamplingParams, samp_arrays, sample, sampling_mode
from smedjan.infer.speculative import Speculation, lookup_round, speculative_generate
from smedjan.infer.stream import decode_text
from smedjan.model import lora
from smedjan.model.cache import init_cache
from smedjan.model.transformer import forward, param_shapes, prepare, serves_adapters

MIN_BUCKET = 16


def next_bucket(n: int, cap: int | None = None, minimum: int = MIN_BUCKET) -> int:
    """Smallest power of two >= n (at least `minimum`), capped at `cap`."""
    b = max(minimum, 1 << max(0, int(n - 1).bit_length()))
    return min(b, cap) if cap is not None else b


# ---- device state + jitted steps --------------------------------------------------------------------
def init_state(cfg: ModelConfig, batch: int, max_len: int, dtype) -> dict:
    return {
        "cache": init_cache(cfg, batch, max_len, dtype),
        "tok": jnp.zeros((batch,), jnp.int32),
        "pos": jnp.zeros((batch,), jnp.int32),
        "counts": jnp.zeros((batch, cfg.vocab_size), jnp.int32),
        "prompt_mask": jnp.zeros((batch, cfg.vocab_size), jnp.bool_),
        "buf": jnp.zeros((batch, max_len), jnp.int32),  # each row's tokens (prompt lookup reads them)
        "adapter": jnp.zeros((batch,), jnp.int32),  # each row's LoRA adapter (0: the base)
        "samp": {
            k: jnp.asarray(np.full((batch,), 1.0 if k in ("top_p", "repetition_penalty") else 0, dt))
            for k, dt in SAMP_DTYPES.items()
        },
    }


def decode_logits(w, cfg: ModelConfig, backend: Backend, cache, tokens, pos, active, kv_len: int, adapters=None):
    """One token per slot through the model: tokens/pos/active [B] -> (fp32 logits [B, V], cache)."""
    logits, cache = forward(
        w,
        tokens[:, None],
        cfg,
        backend=backend,
        positions=pos[:, None],
        cache=cache,
        kv_len=kv_len,
        rope_len=jnp.max(jnp.where(active, pos, 0)) + 1,
        adapter_ids=adapters if serves_adapters(w) else None,
    )
    return logits[:, 0].astype(jnp.float32), cache


def _step_core(w, state, active, cfg, backend, kv_len, top_n, sampling):
    logits, cache = decode_logits(
        w, cfg, backend, state["cache"], state["tok"], state["pos"], active, kv_len, state["adapter"]
    )
    out = sample(logits, state["samp"], state["counts"], state["prompt_mask"], state["pos"], top_n, sampling)
    b = logits.shape[0]
    tok = jnp.where(active, out["tok"], state["tok"])
    new = dict(
        state,
        cache=cache,
        tok=tok,
        pos=jnp.where(active, state["pos"] + 1, state["pos"]),
        counts=state["counts"].at[jnp.arange(b), tok].add(active.astype(jnp.int32)),
    )
    return new, out


@partial(jax.jit, static_argnames=("cfg", "backend", "kv_len", "top_n", "n_steps"), donate_argnames=("state",))
def decode_steps(w, state, active, cfg: ModelConfig, backend: Backend, kv_len: int, top_n: int = 0, n_steps: int = 1):
    """`n_steps` decode steps for every slot in one dispatch; outputs are stacked [n_steps, B, ...].

    Inactive slots neither advance nor count. The count is fixed (no early exit): a row that
    stops inside the chunk keeps decoding until its end and the caller drops those tokens.
    Several steps per dispatch amortise the host cost of a dispatch, which at batch 64 on an
    H100 is larger than the GPU work of one step. Sampling is decided on the device (`sample`'s
    mode None): a server's rows change, and a specialised program per mix would compile mid-stream.
    """
    return jax.lax.scan(
        lambda st, _: _step_core(w, st, active, cfg, backend, kv_len, top_n, None), state, None, length=n_steps
    )


@partial(jax.jit, static_argnames=("cfg", "backend", "top_n"), donate_argnames=("state",))
def prefill_step(w, state, tokens, lens, slots, samp, adapters, cfg: ModelConfig, backend: Backend, top_n: int = 0):
    """Prefill prompts [N, S] (right-padded, lengths `lens`) into cache rows `slots` and sample each
    one's first token with its `samp` row. Attention runs over each prompt itself, not the cache."""
    n, s = tokens.shape
    v = cfg.vocab_size
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (n, s))
    logits, cache = forward(
        w,
        tokens,
        cfg,
        backend=backend,
        positions=positions,
        cache=state["cache"],
        rows=slots,
        attend_cache=False,
        rope_len=jnp.max(lens),
        logits_at=lens - 1,
        adapter_ids=adapters if serves_adapters(w) else None,
    )
    logits = logits.astype(jnp.float32)
    valid = jnp.arange(s)[None] < lens[:, None]
    pm = jnp.zeros((n, v), jnp.bool_).at[jnp.arange(n)[:, None], jnp.where(valid, tokens, v)].set(True, mode="drop")
    counts = jnp.zeros((n, v), jnp.int32)
    out = sample(logits, samp, counts, pm, lens - 1, top_n)
    counts = counts.at[jnp.arange(n), out["tok"]].add(1)
    new = dict(
        state,
        cache=cache,
        tok=state["tok"].at[slots].set(out["tok"]),
        pos=state["pos"].at[slots].set(lens),
        counts=state["counts"].at[slots].set(counts),
        prompt_mask=state["prompt_mask"].at[slots].set(pm),
        buf=state["buf"].at[slots[:, None], positions].set(tokens, mode="drop"),
        adapter=state["adapter"].at[slots].set(adapters),
        samp={k: state["samp"][k].at[slots].set(samp[k]) for k in state["samp"]},
    )
    return new, out


@partial(
    jax.jit,
    static_argnames=("cfg", "backend", "n_steps", "kv_len", "top_n", "sampling"),
    donate_argnames=("state",),
)
def decode_loop(
    w,
    state,
    first,
    active,
    stop_ids,
    cfg: ModelConfig,
    backend: Backend,
    n_steps: int,
    kv_len: int,
    top_n: int = 0,
    sampling: tuple[bool, bool] | None = None,
):
    """Up to `n_steps` decode steps on the device; stops early once every row is done.

    first: the prefill's output dict; stop_ids [K] int32 (-1 padded). Returns (state, tokens [B, n_steps+1],
    logprobs [B, n_steps+1], top (or None), steps taken); rows are -1 after their stop token.

    The steps run `backend.decode_chunk` at a time as a fixed-length scan, and the loop checks for
    early exit between chunks: on GPU a while loop copies its condition to the host every iteration,
    which for a small model costs as much as the step itself. A row past its stop token, or a step
    past `n_steps`, is inactive (writes nothing, does not advance); the results equal one step at a
    time. `sampling`: see `sample`'s `mode`.
    """
    b = first["tok"].shape[0]
    c = max(1, min(backend.decode_chunk, n_steps))
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
        state, out = _step_core(w, state, live, cfg, backend, kv_len, top_n, sampling)
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
class Runner:
    """Owns the weights (inference layout), the device state of B slots × T positions and the backend settings.

    backend: `smedjan.backend.Backend` (default: `settings()` for jax's default backend);
    attn_impl overrides its decode attention ("auto": the backend's choice).
    """

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
        backend: Backend | None = None,
        adapters: list | None = None,
    ):
        self.cfg = cfg
        self.backend = backend or settings()
        if attn_impl != "auto":  # the fused decode-layer kernel runs on the joined q/k/v projection
            fuse = self.backend.fuse_projections or attn_impl == "pallas_fused"
            self.backend = self.backend.replace(decode_impl=attn_impl, fuse_projections=fuse)
        self.min_kv_bucket = min_kv_bucket
        if adapters:  # [(adapters, LoraConfig), ...]: served side by side, row adapter i + 1 (0: the base)
            params = {**params, **lora.stack(adapters, param_shapes(cfg))}
        self.w = prepare(params, cfg, self.backend, dtype)
        self.dtype = self.w["embed"].dtype
        self.cache_dtype = jnp.dtype(cache_dtype or self.dtype)
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.state = init_state(cfg, max_batch, max_seq_len, self.cache_dtype)
        self.pos = np.zeros(max_batch, np.int64)  # host mirror of state["pos"]

    @property
    def attn_impl(self) -> str:
        return self.backend.decode_impl

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
        adapters: list[int] | None = None,
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
            samp_arrays(samp_rows),
            np.asarray(adapters or [0] * n, np.int32),
            cfg=self.cfg,
            backend=self.backend,
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
            backend=self.backend,
            kv_len=kv_len,
            top_n=top_n,
            n_steps=n_steps,
        )
        self.pos[active] += n_steps
        return out

    def lookup_step(self, active: np.ndarray, spec_rows: np.ndarray, spec: Speculation, sampled: bool) -> dict:
        """One prompt-lookup speculative round (`speculative.lookup_round`). Returns host arrays: row b emitted
        toks[b, :n[b] + 1]."""
        kv_len = self.kv_len_for(active, spec.k + 1)
        self.state, out = lookup_round(
            self.w,
            self.state,
            jnp.asarray(active),
            jnp.asarray(spec_rows),
            cfg=self.cfg,
            backend=self.backend,
            spec=spec,
            kv_len=kv_len,
            sampled=sampled,
        )
        out = jax.device_get(out)
        self.pos[active] += out["n"][active] + 1
        return out

    def loop(self, first: dict, active, stop_ids, n_steps: int, kv_len: int, top_n: int = 0, sampling=None):
        """`decode_loop` over this runner's state: returns (tokens, logprobs, top, steps)."""
        self.state, toks, lps, tops, steps = decode_loop(
            self.w,
            self.state,
            first,
            jnp.asarray(active),
            jnp.asarray(stop_ids, jnp.int32),
            cfg=self.cfg,
            backend=self.backend,
            n_steps=n_steps,
            kv_len=kv_len,
            top_n=top_n,
            sampling=sampling,
        )
        return toks, lps, tops, steps


# ---- the public batch API ------------------------------------------------------------------------
def eos_list(eos_id) -> list[int]:
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
    backend: Backend | None = None,
    speculation: Speculation | None = None,
    draft=None,
    stats: dict | None = None,
    lora=None,
):
    """Generate for a batch of prompts; returns the new tokens of each (stop token excluded).

    The decode loop runs on the device. Row i samples with seed `seed + i`, so rows of a
    batch differ while a run stays reproducible. `stop_strings` (needs `tokenizer`) cut a
    row's tokens before the token that completes the stop string. With
    `return_logprobs=True` returns (tokens, logprobs) lists. `params`: flat HF-named params, or the
    inference layout (`model.prepare`), which a caller generating repeatedly prepares once.

    speculation: speculative decoding (`infer.speculative.Speculation`: prompt lookup, or a draft
    model given as `draft=(draft_params, draft_cfg)`); same output distribution, greedy tokens equal.
    `stats`, a dict, receives the rounds, proposed and accepted tokens and the acceptance rate.
    lora: (adapters, LoraConfig) applied to every row without merging it into the weights.
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
    b = len(prompt_ids)
    longest = max(len(p) for p in prompt_ids)
    room = 0 if speculation is None else speculation.validate().k + 1  # a round's block runs past the end
    t = max_seq_len or next_bucket(longest + max_new_tokens + room, minimum=64)
    if longest >= t:
        raise ValueError(f"prompt of {longest} tokens does not fit max_seq_len {t}")
    runner = Runner(
        params, cfg, b, t, dtype=dtype, attn_impl=attn_impl, backend=backend, adapters=[lora] if lora else None
    )
    rows = [sp.row(seed + i) for i in range(b)]
    prompts = [list(p) for p in prompt_ids]
    stops = sorted(set(eos_list(eos_id) + list(stop_token_ids or [])))
    kv_len = next_bucket(longest + max_new_tokens + room, t)
    if speculation is not None:
        if return_logprobs:
            raise ValueError("speculative decoding does not return logprobs")
        draft_runner = None
        if draft is not None:
            draft_runner = Runner(draft[0], draft[1], b, t, dtype=runner.dtype, backend=runner.backend)
        toks, spec_stats = speculative_generate(
            runner, draft_runner, prompts, rows, speculation, max_new_tokens, stops, kv_len
        )
        if stats is not None:
            stats.update(spec_stats)
        lps = np.zeros((b, max_new_tokens), np.float32)
        toks = np.asarray([r + [-1] * (max_new_tokens - len(r)) for r in toks], np.int64).reshape(b, -1)
    else:
        first = runner.prefill(list(range(b)), prompts, rows, adapters=[1 if lora else 0] * b)
        toks, lps, _, _ = runner.loop(
            first, np.ones(b, bool), stops or [-1], max_new_tokens - 1, kv_len, sampling=sampling_mode(rows)
        )
        toks, lps = np.asarray(toks), np.asarray(lps)
    out_t, out_l = [], []
    for i in range(b):
        # Room left in the cache bounds a row too (prompts shorter than the longest have more).
        row, lrow = [], []
        for j in range(toks.shape[1]):
            tok = int(toks[i, j])
            if tok < 0 or tok in stops:
                break
            row.append(tok)
            lrow.append(float(lps[i, j]))
        if stop_strings:
            if tokenizer is None:
                raise ValueError("stop_strings need a tokenizer")
            cut = stop_string_cut(tokenizer, row, stop_strings)
            row, lrow = row[:cut], lrow[:cut]
        out_t.append(row)
        out_l.append(lrow)
    return (out_t, out_l) if return_logprobs else out_t


def stop_string_cut(tokenizer, ids: list[int], stops) -> int:
    for k in range(1, len(ids) + 1):
        text = decode_text(tokenizer, ids[:k])
        if any(s and s in text for s in stops):
            return k - 1
    return len(ids)

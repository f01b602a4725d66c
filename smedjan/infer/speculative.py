"""Speculative decoding: propose k tokens cheaply, verify them in one target forward, keep the agreed prefix.

Proposals come from a draft model (a smaller model sharing the tokenizer; it decodes k tokens on
its own cache) or from prompt lookup (the tokens that followed the latest earlier occurrence of
the sequence's last n-gram: no second model). The target then runs the k + 1 tokens
[last, d1..dk] as one block over its cache and the standard rule (Leviathan et al. 2023, Chen et
al. 2023) decides what stays:

* draft token d_i (drawn from q_i) is accepted with probability min(1, p_i(d_i) / q_i(d_i));
* at the first rejection the next token is drawn from norm(max(0, p_i - q_i)); if all k are
  accepted, a bonus token is drawn from p_{k+1}.

Each emitted token is then distributed exactly as the target's own sampler would give it (p is
the target's distribution after temperature / top-k / top-p / min-p). Greedy rows accept d_i iff
it is the target's argmax, so their tokens equal plain greedy decoding. Prompt lookup is a draft
with a one-hot q. Penalties (repetition, presence, frequency) depend on the tokens emitted inside
a round and are not supported here.

The whole loop (rounds until every row is done) runs on the device in one `lax.while_loop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from smedjan.infer.sampling import uniform
from smedjan.model.transformer import forward, serves_adapters

METHODS = ("draft", "ngram")


@dataclass(frozen=True)
class Speculation:
    """k: tokens proposed per round; method: "draft" (a draft model) or "ngram" (prompt lookup, n-grams
    of `ngram` tokens down to 1)."""

    method: str = "ngram"
    k: int = 4
    ngram: int = 3

    def validate(self) -> Speculation:
        if self.method not in METHODS:
            raise ValueError(f"speculation method must be one of {METHODS}, got {self.method!r}")
        if not 1 <= self.k <= 16:
            raise ValueError(f"speculative k must be in [1, 16], got {self.k}")
        if not 1 <= self.ngram <= 8:
            raise ValueError(f"prompt-lookup n-gram size must be in [1, 8], got {self.ngram}")
        return self


# ---- distributions ---------------------------------------------------------------------------------
def target_probs(logits, samp, sampled: bool = True):
    """The distribution the sampler draws from, [..., V] for logits [..., V] and per-row `samp` [B]
    (leading axis B): temperature, then top-k, top-p (renormalised after top-k), min-p. Greedy rows
    (temperature 0): one-hot on the argmax. `sampled` False (static): every row is greedy."""
    v = logits.shape[-1]
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), v, dtype=jnp.float32)
    if not sampled:
        return greedy
    extra = logits.ndim - 2

    def per_row(x):
        return x.reshape(x.shape + (1,) * (extra + 1))

    temp = jnp.where(samp["temperature"] > 0, samp["temperature"], 1.0)
    sorted_l, idx = jax.lax.top_k(logits / per_row(temp), v)
    ranks = jnp.arange(v)
    neg = jnp.finfo(jnp.float32).min
    k = per_row(samp["top_k"])
    sorted_l = jnp.where((k > 0) & (ranks >= k), neg, sorted_l)
    probs = jax.nn.softmax(sorted_l, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    drop = (before >= per_row(samp["top_p"])) | (probs < per_row(samp["min_p"]) * probs[..., :1])
    sorted_l = jnp.where(drop & (ranks > 0), neg, sorted_l)
    probs = jax.nn.softmax(sorted_l, axis=-1)
    # back to vocabulary order
    out = jnp.zeros_like(probs)
    out = jnp.put_along_axis(out, idx, probs, axis=-1, inplace=False)
    return jnp.where(per_row(samp["temperature"]) > 0, out, greedy)


def draw(probs, u):
    """Inverse-CDF draw from probs [..., V] with uniforms u [...]."""
    cdf = jnp.cumsum(probs, axis=-1)
    kept = jnp.sum(probs > 0, axis=-1)
    choice = jnp.sum(cdf <= (u * cdf[..., -1])[..., None], axis=-1)
    # never past the last token with mass (float round-off at the top of the CDF)
    last = probs.shape[-1] - 1 - jnp.argmax(jnp.flip(probs > 0, axis=-1), axis=-1)
    return jnp.where(kept > 0, jnp.minimum(choice, last), 0).astype(jnp.int32)


_ACCEPT, _RESIDUAL, _DRAFT = 0x1B873593, 0x68E31DA4, 0x2C1B3C6D


def accept(p, q, drafts, valid, seed, pos):
    """The acceptance rule for one round of B rows.

    p [B, k+1, V]: target distributions at the block's positions; q [B, k, V]: the draft's; drafts
    [B, k]; valid [B, k]: proposals that exist (prompt lookup may propose fewer than k; a missing
    proposal is rejected and leaves p unchanged); seed [B]; pos [B]: the block's first position.
    Returns (n accepted [B], next token [B]): the row emits drafts[:n] then next.
    """
    b, k = drafts.shape
    offs = jnp.arange(k)
    pd = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    qd = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = uniform(seed[:, None] ^ jnp.uint32(_ACCEPT), pos[:, None] + offs)
    ok = valid & (qd > 0) & (u * qd < pd)  # u < p/q without dividing
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
    q_pad = jnp.concatenate([q * valid[..., None], jnp.zeros_like(q[:, :1])], axis=1)
    q_n = jnp.take_along_axis(q_pad, n[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_n - q_n, 0.0)
    # p == q at that position leaves nothing: then p itself (the rejection had probability 0 anyway)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_n)
    nxt = draw(residual, uniform(seed ^ jnp.uint32(_RESIDUAL), pos + n))
    return n, nxt


# ---- proposals ---------------------------------------------------------------------------------------
def lookup(buf, length, k: int, ngram: int):
    """Prompt lookup: for each row of buf [B, N] (its first `length` tokens are the sequence), the k tokens
    after the earliest earlier occurrence of the sequence's last n-gram (n = ngram down to 1).
    Returns (drafts [B, k], valid [B, k])."""
    b, n_buf = buf.shape
    j = jnp.arange(n_buf)[None]
    rows = jnp.arange(b)[:, None]
    found = jnp.zeros((b,), bool)
    start = jnp.zeros((b,), jnp.int32)
    for g in range(ngram, 0, -1):
        match = (j >= g - 1) & (j <= length[:, None] - 2) & (length[:, None] >= g)
        for o in range(g):
            key = jnp.take_along_axis(buf, jnp.maximum(length - 1 - o, 0)[:, None], axis=1)
            shifted = buf[rows, jnp.maximum(j - o, 0)]
            match &= shifted == key
        # the earliest occurrence (as transformers' prompt lookup): in a loop its continuation is the longest
        first = jnp.min(jnp.where(match, j, n_buf), axis=1)
        take = ~found & (first < n_buf)
        start = jnp.where(take, first + 1, start)
        found |= take
    idx = start[:, None] + jnp.arange(k)[None]
    valid = found[:, None] & (idx < length[:, None])
    drafts = jnp.take_along_axis(buf, jnp.minimum(idx, n_buf - 1), axis=1)
    return jnp.where(valid, drafts, 0), valid


def _draft_proposals(dw, dcfg, backend, dcache, tok, pos, samp, k, kv_len, sampled):
    """k + 1 draft decode steps from the last token: k proposals and their distributions. The extra step
    puts d_k into the draft's cache, so after a fully accepted round it needs no catch-up."""

    def step(carry, i):
        cache, t = carry
        logits, cache = forward(
            dw, t[:, None], dcfg, backend=backend, positions=(pos + i)[:, None], cache=cache, kv_len=kv_len
        )
        q = target_probs(logits[:, 0].astype(jnp.float32), samp, sampled)
        d = draw(q, uniform(samp["seed"] ^ jnp.uint32(_DRAFT), pos + i))
        return (cache, d), (d, q)

    (dcache, _), (drafts, qs) = jax.lax.scan(step, (dcache, tok), jnp.arange(k + 1))
    return dcache, drafts[:k].T, jnp.swapaxes(qs[:k], 0, 1)


def verify(w, cfg, backend, cache, tok, pos, drafts, q, valid, samp, sampled: bool, kv_len: int, adapters=None):
    """The target's step of a round: [tok, d1..dk] at pos.. through the model over its cache, then the
    acceptance rule. Returns (cache, n accepted [B], next token [B], emitted [B, k+1]: drafts[:n], next,
    then filler)."""
    b, k = drafts.shape
    block = jnp.concatenate([tok[:, None], drafts], axis=1)
    positions = pos[:, None] + jnp.arange(k + 1)[None]
    logits, cache = forward(
        w,
        block,
        cfg,
        backend=backend,
        positions=positions,
        cache=cache,
        kv_len=kv_len,
        adapter_ids=adapters if serves_adapters(w) else None,
    )
    p = target_probs(logits.astype(jnp.float32), samp, sampled)
    n, nxt = accept(p, q, drafts, valid, samp["seed"], pos)
    emitted = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
    emitted = jnp.where(jnp.arange(k + 1)[None] == n[:, None], nxt[:, None], emitted)
    return cache, n, nxt, emitted


@partial(jax.jit, static_argnames=("cfg", "backend", "spec", "kv_len", "sampled"), donate_argnames=("state",))
def lookup_round(w, state, active, spec_rows, cfg, backend, spec: Speculation, kv_len: int, sampled: bool):
    """One prompt-lookup round over a `Runner` state (the serving engine's step when a request asked for
    speculation): rows in `spec_rows` get proposals, the other active rows decode one token as usual
    (same distribution, through the round's block). Returns (state, {"toks" [B, k+1], "n" [B]}): row b
    emitted toks[b, :n[b] + 1]. Needs rows without penalties (their counts are only kept, not applied)."""
    b, k = state["tok"].shape[0], spec.k
    rows = jnp.arange(b)[:, None]
    tok, pos = state["tok"], state["pos"]
    buf = state["buf"].at[jnp.arange(b), pos].set(tok, mode="drop")
    drafts, valid = lookup(buf, pos + 1, k, spec.ngram)
    valid &= spec_rows[:, None]
    q = jax.nn.one_hot(drafts, cfg.vocab_size, dtype=jnp.float32)
    cache, n, nxt, emitted = verify(
        w, cfg, backend, state["cache"], tok, pos, drafts, q, valid, state["samp"], sampled, kv_len, state["adapter"]
    )
    n = jnp.where(active, n, 0)
    keep = (jnp.arange(k + 1)[None] <= n[:, None]) & active[:, None]
    buf = buf.at[rows, jnp.where(keep, pos[:, None] + 1 + jnp.arange(k + 1)[None], buf.shape[1])].set(
        emitted, mode="drop"
    )
    new = dict(
        state,
        cache=cache,
        buf=buf,
        tok=jnp.where(active, nxt, tok),
        pos=jnp.where(active, pos + n + 1, pos),
        counts=state["counts"].at[rows, emitted].add(keep.astype(jnp.int32)),
    )
    return new, {"toks": emitted, "n": n, "proposed": jnp.sum(valid & active[:, None], axis=1)}


@partial(
    jax.jit,
    static_argnames=("cfg", "dcfg", "backend", "spec", "kv_len", "max_new", "sampled"),
    donate_argnames=("cache", "dcache"),
)
def speculative_loop(
    w, cache, dw, dcache, tok, pos, buf, samp, stop_ids, adapters, *, cfg, dcfg, backend, spec, kv_len, max_new, sampled
):
    """Rounds until every row has `max_new` tokens or a stop token; all on the device.

    tok [B]: each row's first generated token (not yet in the caches), at position pos [B]; buf [B, N]:
    the prompt then room for the output (prompt lookup reads it). Returns (tokens [B, max_new] (-1 past
    a row's end), rounds, proposed, accepted)."""
    b = tok.shape[0]
    k = spec.k
    width = max_new + k + 1
    out = jnp.full((b, width), -1, jnp.int32).at[:, 0].set(tok)
    count = jnp.ones((b,), jnp.int32)
    done = jnp.isin(tok, stop_ids) | (max_new <= 1)
    buf = buf.at[jnp.arange(b), pos].set(tok)
    zero = jnp.zeros((), jnp.int32)

    def body(carry):
        cache, dcache, tok, pos, buf, out, count, done, rounds, proposed, accepted = carry
        if spec.method == "draft":
            dcache, drafts, q = _draft_proposals(dw, dcfg, backend, dcache, tok, pos, samp, k, kv_len, sampled)
            valid = jnp.ones((b, k), bool)
        else:
            drafts, valid = lookup(buf, pos + 1, k, spec.ngram)
            q = jax.nn.one_hot(drafts, cfg.vocab_size, dtype=jnp.float32)
        new_cache, n, nxt, emitted = verify(
            w, cfg, backend, cache, tok, pos, drafts, q, valid, samp, sampled, kv_len, adapters
        )
        live = ~done
        keep = (jnp.arange(k + 1)[None] <= n[:, None]) & live[:, None]
        # a stop token ends the row: nothing after it
        is_stop = jnp.isin(emitted, stop_ids) & keep
        first_stop = jnp.argmax(is_stop, axis=1)
        stopped = jnp.any(is_stop, axis=1)
        keep &= ~stopped[:, None] | (jnp.arange(k + 1)[None] <= first_stop[:, None])
        cols = count[:, None] + jnp.arange(k + 1)[None]
        rows = jnp.arange(b)[:, None]
        out = out.at[rows, jnp.where(keep, cols, width)].set(emitted, mode="drop")
        bpos = pos[:, None] + 1 + jnp.arange(k + 1)[None]
        buf = buf.at[rows, jnp.where(keep, bpos, buf.shape[1])].set(emitted, mode="drop")
        m = jnp.sum(keep, axis=1)
        count = count + m
        done = done | stopped | (count >= max_new)
        proposed = proposed + jnp.sum(jnp.where(live, jnp.sum(valid, axis=1), 0))
        accepted = accepted + jnp.sum(jnp.where(live, n, 0))
        tok = jnp.where(live, nxt, tok)
        pos = jnp.where(live, pos + n + 1, pos)
        return new_cache, dcache, tok, pos, buf, out, count, done, rounds + 1, proposed, accepted

    def cond(carry):
        return ~jnp.all(carry[7])

    carry = (cache, dcache, tok, pos, buf, out, count, done, zero, zero, zero)
    carry = jax.lax.while_loop(cond, body, carry)
    out, rounds, proposed, accepted = carry[5], carry[8], carry[9], carry[10]
    return out[:, :max_new], rounds, proposed, accepted


def check_supported(rows: list[dict]) -> None:
    for r in rows:
        if r["repetition_penalty"] != 1.0 or r["presence_penalty"] != 0.0 or r["frequency_penalty"] != 0.0:
            raise ValueError("speculative decoding does not support repetition/presence/frequency penalties")


def speculative_generate(runner, draft, prompts, rows, spec: Speculation, max_new: int, stops, kv_len: int):
    """Prefill `prompts` into `runner` (and `draft`, a Runner of the draft model, for method "draft"), then
    the speculative loop. Returns (tokens per row as lists, stats dict)."""
    check_supported(rows)
    b = len(prompts)
    adapter = [1 if serves_adapters(runner.w) else 0] * b  # generate's one adapter, if any, on every row
    first = runner.prefill(list(range(b)), prompts, rows, adapters=adapter)
    dw = dcache = None
    dcfg = runner.cfg
    if spec.method == "draft":
        if draft is None:
            raise ValueError("speculation method 'draft' needs a draft model")
        if draft.cfg.vocab_size != runner.cfg.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({draft.cfg.vocab_size}) differs from the target's "
                f"({runner.cfg.vocab_size}): a draft must share the tokenizer"
            )
        draft.prefill(list(range(b)), prompts, rows)
        dw, dcache, dcfg = draft.w, draft.state["cache"], draft.cfg
    n_buf = runner.max_seq_len
    buf = np.zeros((b, n_buf), np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    toks, rounds, proposed, accepted = speculative_loop(
        runner.w,
        runner.state["cache"],
        dw,
        dcache,
        first["tok"],
        runner.state["pos"],
        jnp.asarray(buf),
        runner.state["samp"],
        jnp.asarray(stops or [-1], jnp.int32),
        runner.state["adapter"],
        cfg=runner.cfg,
        dcfg=dcfg,
        backend=runner.backend,
        spec=spec,
        kv_len=kv_len,
        max_new=max_new,
        sampled=any(r["temperature"] > 0 for r in rows),
    )
    runner.reset()  # the caches were donated to the loop
    if draft is not None:
        draft.reset()
    toks = np.asarray(toks)
    rounds, proposed, accepted = int(rounds), int(proposed), int(accepted)
    out = []
    for row in toks:  # up to the stop token (excluded), as `generate` returns them
        kept = []
        for t in row:
            if t < 0 or t in stops:
                break
            kept.append(int(t))
        out.append(kept)
    stats = {
        "rounds": rounds,
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "tokens_per_round": float(np.sum(toks >= 0)) / max(rounds, 1) / b,
    }
    return out, stats

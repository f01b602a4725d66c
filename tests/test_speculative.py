"""Speculative decoding: greedy tokens equal plain decoding; the acceptance rule keeps the target distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smedjan.config import preset
from smedjan.infer import generate
from smedjan.infer.speculative import Speculation, accept, draw, lookup
from smedjan.model.transformer import init_params


def _model(seed, layers=2, scale=4.0):
    cfg = preset(
        "tiny",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
        max_position_embeddings=256,
    )
    params = init_params(cfg, jax.random.key(seed))
    # larger weights than the init: peaked, tie-free greedy logits
    return cfg, {k: v * scale if v.ndim >= 2 else v for k, v in params.items()}


@pytest.mark.parametrize("method", ["ngram", "draft", "self"])
def test_greedy_speculative_equals_plain(method):
    cfg, params = _model(0)
    prompts = [[3, 9, 27, 3, 9, 27, 3, 9], [5, 6, 7, 8, 5, 6]]
    want = generate(params, cfg, prompts, max_new_tokens=24)
    draft = None
    if method == "draft":
        draft = _model(1, layers=1)[::-1]
    elif method == "self":  # the target as its own draft: every proposal is accepted
        draft = (params, cfg)
    spec = Speculation("ngram" if method == "ngram" else "draft", k=3)
    stats = {}
    got = generate(params, cfg, prompts, max_new_tokens=24, speculation=spec, draft=draft, stats=stats)
    assert got == want
    assert stats["rounds"] > 0 and stats["proposed"] > 0
    if method == "ngram":  # a model that repeats itself: prompt lookup's proposals are taken
        cfg1, params1 = _model(0, scale=1.0)
        st = {}
        plain = generate(params1, cfg1, prompts, max_new_tokens=24)
        assert generate(params1, cfg1, prompts, max_new_tokens=24, speculation=spec, stats=st) == plain
        assert st["acceptance_rate"] > 0.5
    if method == "self":
        assert stats["acceptance_rate"] == 1.0 and stats["rounds"] <= 24 // 4 + 2
    # stop tokens end a row the same way
    stop = want[0][5]
    assert generate(params, cfg, prompts, max_new_tokens=24, eos_id=stop, speculation=spec, draft=draft) == generate(
        params, cfg, prompts, max_new_tokens=24, eos_id=stop
    )


def _emitted_first(p, q, seeds, onehot_draft=False):
    """The first token a round emits, for each seed: d_1 if accepted, else the residual draw."""
    b = seeds.shape[0]
    k, v = q.shape
    pb = jnp.broadcast_to(p, (b, k + 1, v))
    pos = jnp.zeros((b,), jnp.int32)
    if onehot_draft:
        drafts = jnp.broadcast_to(jnp.arange(k) % v, (b, k)).astype(jnp.int32)
        qb = jax.nn.one_hot(drafts, v)
    else:
        qb = jnp.broadcast_to(q, (b, k, v))
        u = jax.vmap(lambda s: jax.random.uniform(jax.random.key(s), (k,)))(seeds)
        drafts = draw(qb, u)
    n, nxt = accept(pb, qb, drafts, jnp.ones((b, k), bool), seeds.astype(jnp.uint32), pos)
    return jnp.where(n > 0, drafts[:, 0], nxt), n


@pytest.mark.parametrize("onehot_draft", [False, True])
def test_acceptance_rule_keeps_the_target_distribution(onehot_draft):
    """Chen et al.'s rule: whatever the draft q, the emitted token is distributed as the target p
    (20k draws, total variation distance within sampling noise)."""
    rng = np.random.default_rng(0)
    v, k = 6, 2
    p = jnp.asarray(rng.dirichlet(np.ones(v) * 0.7, size=k + 1), jnp.float32)
    q = jnp.asarray(rng.dirichlet(np.ones(v) * 0.7, size=k), jnp.float32)
    seeds = jnp.arange(20000)
    first, n = _emitted_first(p, q, seeds, onehot_draft)
    freq = np.bincount(np.asarray(first), minlength=v) / len(seeds)
    tv = 0.5 * np.abs(freq - np.asarray(p[0])).sum()
    assert tv < 0.015, (freq, np.asarray(p[0]))
    # the test can fail: the draft's own distribution is far from p
    q0 = np.asarray(q[0]) if not onehot_draft else np.eye(v)[0]
    assert 0.5 * np.abs(q0 - np.asarray(p[0])).sum() > 0.1
    assert 0 < float(jnp.mean(n > 0)) < 1  # some rounds accept, some reject


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    buf = jnp.asarray([[1, 2, 3, 9, 9, 1, 2, 3, 0, 0], [4, 5, 6, 7, 0, 0, 0, 0, 0, 0]], jnp.int32)
    drafts, valid = lookup(buf, jnp.asarray([8, 4]), k=3, ngram=3)
    # row 0: "1 2 3" occurred at 0..2; what followed: 9 9 1
    assert drafts[0].tolist() == [9, 9, 1] and valid[0].all()
    # row 1: 7 never occurred before: nothing to propose
    assert not valid[1].any()
    drafts, valid = lookup(buf, jnp.asarray([4, 4]), k=4, ngram=2)
    assert not valid[0, 0]  # "9" (1-gram) at 3 is the last token itself: no earlier occurrence


def test_generate_cli_speculation(tmp_path, capsys):
    """`smedjan generate --prompt-lookup` and `--draft MODEL` print what plain greedy decoding prints."""
    from test_generate import make_tiny_checkpoint

    from smedjan.cli import main

    make_tiny_checkpoint(tmp_path / "target", seed=0)
    make_tiny_checkpoint(tmp_path / "draft", seed=1, num_hidden_layers=1)
    base = ["generate", str(tmp_path / "target"), "--prompt", "the anvil, the anvil, the", "--max-new-tokens", "12"]
    assert main(base) == 0
    want = capsys.readouterr().out
    for extra in (["--prompt-lookup", "--spec-k", "3"], ["--draft", str(tmp_path / "draft")]):
        assert main(base + extra) == 0
        out = capsys.readouterr()
        assert out.out == want and "accepted" in out.err
    assert main(base + ["--draft", str(tmp_path / "missing")]) == 1
    assert "--draft" in capsys.readouterr().err


def test_engine_per_request_prompt_lookup():
    """Requests that ask for speculation (prompt lookup) and plain ones share the engine's batch; greedy
    outputs equal plain generation; a penalised request in the batch turns speculation off, not wrong."""
    from smedjan.infer.sampling import SamplingParams
    from smedjan.serve.engine import Engine

    # small weights: the model mostly repeats itself, so prompt lookup has something to find
    cfg, params = _model(0, scale=1.0)
    prompts = [[3, 9, 27, 3, 9, 27, 3, 9], [5, 6, 7, 8, 5, 6], [1, 2, 3]]
    want = generate(params, cfg, prompts, max_new_tokens=20)
    with Engine(params, cfg, max_batch=4, max_seq_len=64, speculation=Speculation("ngram", k=3)) as engine:
        reqs = [
            engine.submit(p, SamplingParams(max_new_tokens=20, speculative=i != 1, seed=0))
            for i, p in enumerate(prompts)
        ]
        assert [r.result()[0] for r in reqs] == want
        assert engine.spec_accepted > 0
        pen = SamplingParams(max_new_tokens=20, repetition_penalty=1.3)
        reqs = [
            engine.submit(prompts[0], SamplingParams(max_new_tokens=20, speculative=True)),
            engine.submit(prompts[1], pen),
        ]
        assert reqs[0].result()[0] == want[0]
        assert reqs[1].result()[0] == generate(params, cfg, [prompts[1]], max_new_tokens=20, repetition_penalty=1.3)[0]
    with pytest.raises(ValueError):
        SamplingParams(speculative=True, logprobs=True).validate()

"""The chunked cross-entropy's one-pass log-sum-exp, padding, ignored targets and HLO shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smedjan.train.loss import _logsumexp_rows, chunked_cross_entropy, naive_cross_entropy


def test_one_pass_logsumexp_matches_jax(monkeypatch):
    x = 40.0 * jax.random.normal(jax.random.key(0), (7, 1003))
    x = (
        x.at[1]
        .set(-jnp.inf)  # a row of -inf: -inf, not nan
        .at[2, :900]
        .set(-jnp.inf)  # mostly -inf
        .at[3, 5]
        .set(jnp.inf)  # +inf wins
        .at[4, 17]
        .set(jnp.nan)  # nan propagates
        .at[5]
        .set(0.0)  # all equal: log V
        .at[6]
        .add(1e4)
    )  # far from zero
    got = np.asarray(jax.jit(lambda x: _logsumexp_rows(x, True))(x))
    want = np.asarray(jax.nn.logsumexp(x, axis=-1))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.isneginf(got[1]) and np.isposinf(got[3]) and np.isnan(got[4])
    np.testing.assert_allclose(got[5], np.log(1003), rtol=1e-6)
    # a single column and a [c, 1] input: lse = the value itself
    np.testing.assert_allclose(np.asarray(_logsumexp_rows(x[:, :1], True))[[0, 5, 6]], np.asarray(x[[0, 5, 6], 0]))


@pytest.mark.parametrize("one_pass", [True, False])  # the GPU's and the other backends' log-sum-exp
@pytest.mark.parametrize("chunk", [16, 23, 74, 512])
def test_padding_and_ignored_targets_equal_naive(monkeypatch, chunk, one_pass):
    # 2 x 37 = 74 tokens: chunk 16 gives 5 strided chunks of 15 (1 padded token), 23 gives 4 of 19
    # (2 padded); the first 20 targets and the last 3 are ignored
    k = jax.random.split(jax.random.key(1), 3)
    hidden = jax.random.normal(k[0], (2, 37, 24))
    weight = 0.5 * jax.random.normal(k[1], (300, 24))
    targets = jax.random.randint(k[2], (2, 37), 0, 300).at[0, :20].set(-1).at[1, -3:].set(-1)

    def mean(fn):
        def f(h, w):
            s, n = fn(h, w, targets)
            return s / n

        return f

    chunked = mean(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk_size=chunk, one_pass=one_pass))
    s, n = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk, one_pass=one_pass)
    s_ref, n_ref = naive_cross_entropy(hidden, weight, targets)
    assert int(n) == int(n_ref) == 74 - 23
    np.testing.assert_allclose(float(s), float(s_ref), rtol=1e-5)
    g = jax.grad(chunked, argnums=(0, 1))(hidden, weight)
    g_ref = jax.grad(mean(naive_cross_entropy), argnums=(0, 1))(hidden, weight)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(g[0])[0, :20]) and not np.any(np.asarray(g[0])[1, -3:])  # ignored: no gradient


def test_loss_reads_logits_in_one_reduce_and_one_elementwise_pass(monkeypatch):
    """Forward+grad lowering with the GPU's one-pass log-sum-exp: one reduce and one exp over the
    [c, V] logits, no scatter (the onehot is an iota compare inside the dlogits expression)."""
    hidden = jnp.zeros((2, 40, 16), jnp.bfloat16)
    weight = jnp.zeros((96, 16))
    targets = jnp.zeros((2, 40), jnp.int32)
    f = jax.value_and_grad(
        lambda h, w: chunked_cross_entropy(h, w, targets, chunk_size=40, one_pass=True)[0], argnums=(0, 1)
    )
    hlo = jax.jit(f).lower(hidden, weight).as_text()
    logits = "tensor<40x96xf32>"  # 80 tokens: 2 chunks of 40
    assert "scatter" not in hlo
    assert sum("stablehlo.reduce(" in ln and logits in ln for ln in hlo.splitlines()) == 1
    assert sum("stablehlo.exponential" in ln and logits in ln for ln in hlo.splitlines()) == 1

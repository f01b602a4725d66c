"""smedjan/eval/perplexity.py against the definition computed here from the model's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smedjan.config import ModelConfig
from smedjan.errors import UserError
from smedjan.eval.perplexity import perplexity
from smedjan.model.transformer import forward, init_params


def test_perplexity_is_exp_mean_nll_over_windows():
    cfg = ModelConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    params = init_params(cfg, jax.random.key(0))
    params = {k: v * 10 if v.ndim >= 2 else v for k, v in params.items()}  # far from uniform
    ids = np.random.default_rng(0).integers(0, 50, 75)  # 4 windows of 16 (+ 11 tokens dropped), batch 3 pads
    r = perplexity(params, cfg, ids, ctx=16, batch=3)
    win = jnp.asarray(ids[:64].reshape(4, 16))
    logp = jax.nn.log_softmax(forward(params, win[:, :-1], cfg), axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(win[:, 1:, None]), axis=-1).mean()
    assert r["tokens"] == 4 * 15 and r["windows"] == 4
    assert r["perplexity"] == pytest.approx(float(np.exp(nll)), rel=1e-5)
    with pytest.raises(UserError, match="ctx"):
        perplexity(params, cfg, ids, ctx=32)
    with pytest.raises(UserError, match="too short"):
        perplexity(params, cfg, ids[:10], ctx=16)

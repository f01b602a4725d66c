"""q/k/v and gate/up run as one GEMM each: same logits and gradients as separate projections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smedjan.backend import settings
from smedjan.config import preset
from smedjan.model.transformer import forward, init_params
from smedjan.train.loss import chunked_cross_entropy


@pytest.mark.parametrize("model_type,heads,kv_heads", [("llama", 4, 4), ("qwen2", 6, 2), ("qwen3", 4, 1)])
def test_fused_projections_equal_separate(model_type, heads, kv_heads):
    cfg = preset(
        "tiny",
        model_type=model_type,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=8,
        vocab_size=97,
    )
    params = init_params(cfg, jax.random.key(0))
    # random (not zero / one) biases and norms, so a mixed-up q/k/v group would show
    params = {
        k: v + 0.1 * jax.random.normal(jax.random.key(i), v.shape) if k.endswith(("bias", "norm.weight")) else v
        for i, (k, v) in enumerate(sorted(params.items()))
    }
    assert ("model.layers.self_attn.q_proj.bias" in params) == (model_type == "qwen2")
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, cfg.vocab_size)
    targets = jnp.roll(tokens, -1, axis=1).at[:, -1].set(-1)

    def run(p, remat, backend):
        hidden = forward(p, tokens, cfg, backend=backend, remat=remat, return_hidden=True)
        s, n = chunked_cross_entropy(hidden, p["model.embed_tokens.weight"], targets, chunk_size=8)
        return s / n

    joined, apart = settings("cpu", fuse_projections=True), settings("cpu", fuse_projections=False)
    fused = {
        r: (forward(params, tokens, cfg, backend=joined), jax.value_and_grad(run)(params, r, joined))
        for r in ("none", "dots")
    }
    ref_logits = forward(params, tokens, cfg, backend=apart)
    ref_loss, ref_grads = jax.value_and_grad(run)(params, "none", apart)

    for logits, (loss, grads) in fused.values():
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
        assert grads.keys() == ref_grads.keys() == params.keys()  # same HF-named parameter tree
        for k in grads:
            scale = float(jnp.max(jnp.abs(ref_grads[k])))
            assert scale > 0, k
            np.testing.assert_allclose(
                np.asarray(grads[k]), np.asarray(ref_grads[k]), rtol=1e-5, atol=1e-6 * scale, err_msg=k
            )


def test_one_gemm_per_projection_group():
    """Fused (the GPU default), a layer's forward runs qkv, q·kᵀ, p·v, o, gate·up, down: 6 dot_generals, not 9."""
    cfg = preset(
        "tiny",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
    )
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.zeros((1, 8), jnp.int32)
    hlo = (
        jax.jit(lambda p: forward(p, tokens, cfg, backend=settings("cpu", fuse_projections=True), return_hidden=True))
        .lower(params)
        .as_text()
    )
    assert hlo.count("stablehlo.dot_general") == 6

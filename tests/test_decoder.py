"""One decoder: prefill and decode through the model's own blocks (inference layout, per-layer cache)
give the logits of the training forward, for every architecture and every decode implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_utils import ARCHS, build_hf_model

from smedjan.backend import settings
from smedjan.checkpoint import load_hf
from smedjan.model import forward, init_cache, prepare


def _decode_logits(params, cfg, backend, tokens, prompt_lens, kv_len=32):
    """Prefill each row's first `prompt_lens[i]` tokens into cache rows in reverse order, then feed the
    rest one token per step (teacher forcing); returns logits [B, S, V] from position min(len)-1 on."""
    b, s = tokens.shape
    w = prepare(params, cfg, backend)
    cache = init_cache(cfg, b, kv_len, jnp.float32)
    slots = jnp.arange(b)[::-1]
    lens = jnp.asarray(prompt_lens)
    longest = max(prompt_lens)
    prompt = np.where(np.arange(longest)[None] < np.asarray(prompt_lens)[:, None], tokens[:, :longest], 0)
    last, cache = forward(
        w,
        jnp.asarray(prompt[::-1]),
        cfg,
        backend=backend,
        cache=cache,
        rows=slots,
        attend_cache=False,
        logits_at=lens[::-1] - 1,
    )
    out = np.zeros((b, s, cfg.vocab_size), np.float32)
    out[np.arange(b), np.asarray(prompt_lens) - 1] = np.asarray(last)[::-1]
    pos = np.asarray(prompt_lens).copy()
    step = jax.jit(
        lambda w, t, p, c: forward(w, t[:, None], cfg, backend=backend, positions=p[:, None], cache=c, kv_len=kv_len)
    )
    while pos.min() < s:
        p = np.minimum(pos, s - 1)
        logits, cache = step(w, jnp.asarray(tokens[np.arange(b), p]), jnp.asarray(p), cache)
        live = pos < s
        out[np.arange(b)[live], p[live]] = np.asarray(logits[:, 0])[live]
        pos = pos + 1
    return out


def _check(cfg, params, backend, tol=1e-4):
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20))
    full = np.asarray(forward(params, jnp.asarray(tokens), cfg, backend=settings("cpu")))
    lens = [7, 12]
    got = _decode_logits(params, cfg, backend, tokens, lens)
    for row, n in enumerate(lens):  # from each prompt's last token on
        err = np.max(np.abs(got[row, n - 1 :] - full[row, n - 1 :])) / np.max(np.abs(full))
        assert err < tol, (row, err)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("fuse", [False, True])
def test_decode_equals_forward_every_architecture(tmp_path, arch, fuse):
    build_hf_model(arch, seed=11).save_pretrained(tmp_path)
    cfg, params = load_hf(tmp_path)
    _check(cfg, params, settings("cpu", fuse_projections=fuse))


@pytest.mark.parametrize("impl", ["pallas", "pallas_fused"])
def test_decode_equals_forward_pallas_kernels(tmp_path, impl):
    """The split-K decode kernel and the fused decode-layer kernel (interpreted), inside the one decoder."""
    build_hf_model("mistral", seed=12, head_dim=32).save_pretrained(tmp_path)
    cfg, params = load_hf(tmp_path)
    _check(cfg, params, settings("cpu", fuse_projections=True, decode_impl=impl))

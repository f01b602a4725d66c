"""Fused decode-layer attention (rope, cache write, attention) vs. reference.

CPU: Pallas interpret mode on small shapes.  The caches are pre-filled with
random data in the visible slots (a missed or misplaced slot changes the
output) and NaN in every slot the new token must not see (any unmasked read
poisons the output).  Interpret mode fills non-aliased outputs with NaN first,
so an unwritten output tile fails the finiteness check.  The lowering test
builds the Triton IR for CUDA on CPU (the compiled path) without running it.
GPU tests (``-m gpu``) run the compiled kernel on the 1b model's decode shapes.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_layer_attention import decode_layer_attention, decode_layer_attention_reference, supported

ON_GPU = jax.default_backend() == "gpu"
gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not ON_GPU, reason=f"needs a CUDA GPU (compiled Triton kernels); default backend is {jax.default_backend()!r}"
    ),
]


def _rope_factors(pos, D, theta=10000.0):
    inv = 1.0 / theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
    ang = np.asarray(pos, np.float64)[:, None] * inv[None]
    ang = np.concatenate([ang, ang], axis=-1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _inputs(seed, B, T, Hq, Hkv, D, dtype, pos, cache_dtype=None):
    # numpy RNG (no per-shape sampler compiles); nothing is zero.
    rng = np.random.default_rng(seed)
    cache_dtype = cache_dtype or dtype
    qkv = rng.standard_normal((B, (Hq + 2 * Hkv) * D), np.float32)
    kc = rng.standard_normal((B, T, Hkv, D), np.float32)
    vc = rng.standard_normal((B, T, Hkv, D), np.float32)
    cos, sin = _rope_factors(pos, D)
    return (
        jnp.asarray(qkv.astype(dtype)),
        jnp.asarray(cos.astype(dtype)),
        jnp.asarray(sin.astype(dtype)),
        jnp.asarray(pos, jnp.int32),
        jnp.asarray(kc.astype(cache_dtype)),
        jnp.asarray(vc.astype(cache_dtype)),
    )


def _rel(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "non-finite output (unwritten tile?)"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _grouped(qkv, B, Hq, Hkv, D):
    """[B, (q heads, k heads, v heads) D] -> the model's per-kv-head layout [B, (Hkv, G + 2) D]."""
    q, k, v = jnp.split(qkv.reshape(B, Hq + 2 * Hkv, D), [Hq, Hq + Hkv], axis=1)
    q = q.reshape(B, Hkv, Hq // Hkv, D)
    return jnp.concatenate([q, k[:, :, None], v[:, :, None]], axis=2).reshape(B, -1)


def _check(seed, B, T, Hq, Hkv, D, dtype, pos, window=None, block_k=None, kv_len=None, cache_dtype=None, grouped=False):
    args = _inputs(seed, B, T, Hq, Hkv, D, dtype, pos, cache_dtype)
    kw = dict(num_heads=Hq, num_kv_heads=Hkv, head_dim=D, sliding_window=window)
    ref, rk, rv = decode_layer_attention_reference(*args, **kw)
    # The kernel's caches hold NaN in every slot the new token must not see
    # (after pos, before the window): a read that is not masked away before it
    # meets the softmax or the PV product (0 * NaN) poisons the output.
    j = np.arange(T)[None, :]
    p = np.asarray(pos)[:, None]
    stale = (j > p) | ((j <= p - window) if window else False)
    args = list(args)
    for i in (4, 5):
        c = np.array(args[i])
        c[stale] = np.nan
        args[i] = jnp.asarray(c)
    k_in, v_in = np.asarray(args[4], np.float32), np.asarray(args[5], np.float32)
    if grouped:
        args[0] = _grouped(args[0], B, Hq, Hkv, D)
    out, kc, vc = decode_layer_attention(*args, **kw, block_k=block_k, kv_len=kv_len, grouped=grouped)
    assert out.shape == (B, Hq * D) and out.dtype == args[0].dtype
    assert kc.dtype == args[4].dtype and vc.dtype == args[5].dtype
    f32 = jnp.dtype(dtype) == jnp.float32
    tol = 1e-5 if f32 else 2e-2
    assert _rel(out, ref) < tol
    # Per (row, head): no head may be wrong while the global error is small.
    o = np.asarray(out, np.float32).reshape(B, Hq, D)
    r = np.asarray(ref, np.float32).reshape(B, Hq, D)
    err = np.linalg.norm(o - r, axis=-1) / np.linalg.norm(r, axis=-1)
    assert (err < 3 * tol).all(), np.argwhere(err >= 3 * tol)[:5]
    # Caches: the written slot matches the reference, every other slot is
    # exactly what it was.
    ctol = 1e-6 if jnp.dtype(kc.dtype) == jnp.float32 else 1e-2
    rows = np.arange(B)
    for got, want, before in ((kc, rk, k_in), (vc, rv, v_in)):
        got = np.asarray(got, np.float32)
        want = np.asarray(want, np.float32)
        np.testing.assert_allclose(got[rows, pos], want[rows, pos], rtol=ctol, atol=ctol)
        untouched = np.ones((B, T), bool)
        untouched[rows, pos] = False
        np.testing.assert_array_equal(got[untouched], before[untouched])


CASES = [
    # B, T, Hq, Hkv, D, dtype, window, block_k, kv_len
    (3, 200, 8, 2, 64, jnp.float32, None, None, None),  # GQA, T % 64 != 0
    (3, 200, 8, 2, 64, jnp.float32, 48, 32, None),  # window
    (3, 150, 4, 1, 128, jnp.float32, None, None, None),  # MQA, D=128
    (3, 96, 4, 4, 64, jnp.float32, None, 32, None),  # MHA (G=1)
    (3, 80, 32, 2, 32, jnp.float32, 17, 16, None),  # G=16, D=32
    (3, 10, 4, 2, 64, jnp.float32, None, None, None),  # T < block_k
    (3, 300, 8, 2, 128, jnp.bfloat16, None, None, None),  # bf16 GQA D=128
    (3, 130, 4, 1, 64, jnp.bfloat16, 40, None, 130),  # bf16 MQA window
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,dtype,window,block_k,kv_len", CASES)
def test_matches_reference(B, T, Hq, Hkv, D, dtype, window, block_k, kv_len):
    pos = [0, (T * 5) // 8, T - 1][:B]
    _check(T + D + Hq, B, T, Hq, Hkv, D, dtype, pos, window, block_k, kv_len)


@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (4, 4), (4, 1)])
def test_grouped_qkv_layout(Hq, Hkv):
    """The model's joined q/k/v (per kv head: its query heads, its k, its v) gives the same results."""
    _check(5, 3, 100, Hq, Hkv, 64, jnp.float32, [99, 0, 33], window=40, grouped=True)


def test_fp32_compute_bf16_cache():
    _check(7, 3, 100, 8, 2, 64, jnp.float32, [99, 0, 33], cache_dtype=jnp.bfloat16)


def test_kv_len_cap_and_repeated_positions():
    # kv_len caps the blocks read (all positions below it); rows share a pos.
    _check(11, 3, 256, 8, 4, 64, jnp.float32, [70, 70, 5], kv_len=80)


def test_supported_shapes():
    assert supported(32, 4, 64) and supported(4, 4, 128) and supported(16, 1, 32)
    assert not supported(24, 8, 64)  # G = 3
    assert not supported(8, 2, 80)  # D not a power of two
    assert not supported(8, 2, 16)  # D/2 < 16: no tensor-core dot
    with pytest.raises(ValueError):
        decode_layer_attention(
            jnp.zeros((1, (24 + 16) * 64)),
            jnp.zeros((1, 64)),
            jnp.zeros((1, 64)),
            jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 8, 8, 64)),
            jnp.zeros((1, 8, 8, 64)),
            num_heads=24,
            num_kv_heads=8,
            head_dim=64,
        )


@pytest.mark.parametrize(
    "B,T,Hq,Hkv,D,window,dtype",
    [
        (1, 2048, 32, 4, 64, None, jnp.bfloat16),
        (2, 100, 4, 1, 128, 16, jnp.float32),
        (2, 64, 4, 4, 32, None, jnp.float16),
    ],
)
def test_lowers_to_triton(monkeypatch, B, T, Hq, Hkv, D, window, dtype):
    """The compiled path: lower to Triton IR for CUDA (no GPU needed)."""
    from triton_lowering import TRITON_CALL, lower_for_cuda

    mod = importlib.import_module("pallas_kernels.decode_layer_attention")
    S = jax.ShapeDtypeStruct
    args = (
        S((B, (Hq + 2 * Hkv) * D), dtype),
        S((B, D), dtype),
        S((B, D), dtype),
        S((B,), jnp.int32),
        S((B, T, Hkv, D), dtype),
        S((B, T, Hkv, D), dtype),
    )
    text = lower_for_cuda(
        monkeypatch,
        mod.__name__,
        lambda *a: mod.decode_layer_attention(
            *a, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, sliding_window=window, interpret=False
        ),
        *args,
    )
    assert text.count(TRITON_CALL) == 1
    assert "decode_layer_attention" in text


# ------------------------------------------------------------ end to end --
def _tiny(**overrides):
    from smedjan.config import ModelConfig
    from smedjan.model.transformer import init_params

    kw = dict(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=128,
    )
    kw.update(overrides)
    cfg = ModelConfig(**kw)
    params = init_params(cfg, jax.random.key(0))
    # Larger weights than the init's 0.02: peaked, tie-free greedy logits.
    params = {k: v * 6.0 if v.ndim >= 2 else v for k, v in params.items()}
    return cfg, params


def _uses_fused_kernel(cfg, params, b):
    from smedjan.backend import settings
    from smedjan.model import forward, init_cache, prepare

    backend = settings("cpu", fuse_projections=True, decode_impl="pallas_fused")
    w = prepare(params, cfg, backend)
    ones = jnp.ones((b, 1), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda c: forward(w, ones, cfg, backend=backend, positions=ones, cache=c, kv_len=32))(
        init_cache(cfg, b, 32, jnp.float32)
    )
    return "decode_layer_attention" in str(jaxpr)


@pytest.mark.parametrize(
    "prompts,overrides",
    [
        ([[5, 17, 99, 3, 250, 42]], {}),
        ([[5, 17, 99, 3, 250, 42, 7, 8, 9], [200, 1, 64]], dict(head_dim=64, sliding_window=6)),
    ],
)
def test_generate_matches_xla(prompts, overrides):
    from smedjan.infer import generate

    cfg, params = _tiny(**overrides)
    if len(prompts) > 1:  # the fused kernel is really on the decode path
        assert _uses_fused_kernel(cfg, params, len(prompts))
    kw = dict(max_new_tokens=10, max_seq_len=64)
    ref = generate(params, cfg, prompts, attn_impl="xla", **kw)
    out = generate(params, cfg, prompts, attn_impl="pallas_fused", **kw)
    assert out == ref
    assert all(len(r) == 10 for r in ref)


# ------------------------------------------------------------------ GPU --
@pytest.mark.parametrize("B", [1, 8])
@gpu[0]
@gpu[1]
def test_gpu_decode_layer_attention(B):
    T, Hq, Hkv, D = 2048, 32, 4, 64
    if B == 1:
        positions = [[T - 1], [1000], [0]]
    else:
        p = np.sort(np.random.default_rng(B).integers(0, T, B))
        p[0], p[-1] = 0, T - 1
        positions = [p.tolist()]
    for window in (None, 512):
        for pos in positions:
            for grouped in (False, True):
                _check(B + pos[0], B, T, Hq, Hkv, D, jnp.bfloat16, pos, window, grouped=grouped)

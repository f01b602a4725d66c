"""Flash / decode attention vs. the fp32 reference.

CPU (CI): Pallas interpret mode on small shapes.  Interpret mode fills output
buffers with NaN before the kernel runs, so any tile the kernel fails to write
shows up as NaN and fails the finiteness check.  Every gradient is also
compared block by block (16 rows x 1 head), so a block that is missing its
contributions fails even when the global error is small.
GPU tests (``-m gpu``) run the compiled Triton kernels on realistic shapes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.reference import attention_reference, decode_attention_reference

ON_GPU = jax.default_backend() == "gpu"
gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not ON_GPU, reason=f"needs a CUDA GPU (compiled Triton kernels); default backend is {jax.default_backend()!r}"
    ),
]


def rel_err(out, ref):
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "non-finite values (unwritten tile?)"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def block_errs_ok(out, ref, tol, rows=16):
    """Every [rows, 1 head] block of [B, S, H, D] within tol of the reference.

    Relative to the block's own reference norm, floored at 5% of the typical
    (rms) block norm so that near-zero blocks do not demand absolute agreement
    at the level of rounding noise.  A block that received nothing (left at 0)
    has error == its norm and fails unless its reference is ~0 as well.
    """
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    pad = ((0, 0), (0, -ref.shape[1] % rows), (0, 0), (0, 0))
    shape = (ref.shape[0], -1, rows) + ref.shape[2:]
    o = np.pad(out, pad).reshape(shape)
    r = np.pad(ref, pad).reshape(shape)
    err = np.sqrt(((o - r) ** 2).sum(axis=(2, 4)))  # [B, S/rows, H]
    norm = np.sqrt((r**2).sum(axis=(2, 4)))
    typical = np.sqrt((norm**2).mean())
    bad = err > tol * np.maximum(norm, 0.05 * typical)
    return not bad.any(), np.argwhere(bad)[:5].tolist()


def _inputs(seed, B, S, Hq, Hkv, D, dtype, T=None):
    # numpy RNG: jax.random would compile a sampler per shape (~1 s per case
    # on CPU), which dominated the CPU run time of this file.
    rng = np.random.default_rng(seed)
    T = S if T is None else T
    return tuple(
        jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype))
        for shape in [(B, S, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, S, Hq, D)]
    )


def _segments(seed, B, S, n=3):
    ids = np.random.default_rng(seed + 1000).integers(0, n, (B, S))
    return jnp.asarray(np.sort(ids, axis=1).astype(np.int32))  # packed docs


@functools.lru_cache(maxsize=4)
def _reference(seed, B, S, Hq, Hkv, D, dtype, T, causal, window, seg, sm_scale):
    """fp32 reference output and (dq, dk, dv) for _check's inputs (numpy)."""
    q, k, v, do = (x.astype(jnp.float32) for x in _inputs(seed, B, S, Hq, Hkv, D, dtype, T))
    segment_ids = _segments(seed, B, S) if seg else None
    r = functools.partial(
        attention_reference, causal=causal, sliding_window=window, segment_ids=segment_ids, sm_scale=sm_scale
    )

    @jax.jit  # one compile instead of op-by-op dispatch of the reference
    def ref_and_grads(q, k, v, do):
        ref, rvjp = jax.vjp(r, q, k, v)
        return ref, rvjp(do)

    ref, grads = ref_and_grads(q, k, v, do)
    return np.asarray(ref), tuple(np.asarray(g) for g in grads)


def _check(
    seed,
    B,
    S,
    Hq,
    Hkv,
    D,
    dtype,
    *,
    causal=True,
    window=None,
    seg=False,
    sm_scale=None,
    bq=32,
    bk=32,
    grads=True,
    T=None,
    tol=None,
    backend="triton",
):
    q, k, v, do = _inputs(seed, B, S, Hq, Hkv, D, dtype, T)
    segment_ids = _segments(seed, B, S) if seg else None
    kw = dict(causal=causal, sliding_window=window, segment_ids=segment_ids, sm_scale=sm_scale)
    f = lambda q, k, v: flash_attention(
        q, k, v, block_q=bq, block_k=bk, block_q_bwd=bq, block_k_bwd=bk, backend=backend, **kw
    )
    if tol is None:
        tol = 1e-4 if dtype == jnp.float32 else 2e-2
    if not grads:
        r = lambda q, k, v: attention_reference(
            q, k, v, causal=causal, sliding_window=window, segment_ids=segment_ids, sm_scale=sm_scale
        )
        assert rel_err(f(q, k, v), r(q, k, v)) < tol
        return
    out, vjp = jax.vjp(f, q, k, v)
    ref, rgrads = _reference(seed, B, S, Hq, Hkv, D, dtype, T, causal, window, seg, sm_scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_err(out, ref) < tol, "forward"
    grads = vjp(do)
    for name, g, rg, x in zip("qkv", grads, rgrads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert rel_err(g, rg) < 2 * tol, f"d{name}"
        ok, bad = block_errs_ok(g, rg, 10 * tol)
        assert ok, f"d{name}: (batch, row block, head) out of tolerance: {bad}"


# (name, kwargs) grid: causal/full, window, GQA/MQA, segments, ragged S,
# D 64/128, fp32 + bf16 + fp16.  Each case draws fresh inputs from its own seed.
CASES = [
    ("causal_mha_f32", dict(B=1, S=64, Hq=2, Hkv=2, D=64, dtype=jnp.float32, bq=16, bk=16)),
    ("full_gqa_ragged_f32", dict(B=2, S=100, Hq=4, Hkv=2, D=64, dtype=jnp.float32, causal=False, bq=64)),
    ("d128_causal_ragged_gqa_bf16", dict(B=1, S=100, Hq=4, Hkv=2, D=128, dtype=jnp.bfloat16, bk=64)),
    ("window_mqa_f32", dict(B=1, S=64, Hq=4, Hkv=1, D=64, dtype=jnp.float32, window=20, bq=16, bk=16)),
    ("window_ragged_bf16", dict(B=2, S=72, Hq=2, Hkv=1, D=64, dtype=jnp.bfloat16, window=17, bk=16)),
    ("segments_causal_gqa_f32", dict(B=2, S=64, Hq=4, Hkv=2, D=64, dtype=jnp.float32, seg=True, bq=16)),
    ("segments_full_ragged_f32", dict(B=1, S=72, Hq=2, Hkv=2, D=64, dtype=jnp.float32, seg=True, causal=False)),
    ("segments_window_f32", dict(B=1, S=64, Hq=2, Hkv=1, D=64, dtype=jnp.float32, seg=True, window=30, bq=16, bk=16)),
    # Window much narrower than the kv block: some rows' first visited block
    # is fully masked (regression: FMA-contracted exp2 overflow gave NaN).
    ("narrow_window_big_blocks_f32", dict(B=2, S=72, Hq=4, Hkv=2, D=64, dtype=jnp.float32, window=7, bq=64, bk=64)),
    ("d128_full_scale_f32", dict(B=1, S=48, Hq=2, Hkv=2, D=128, dtype=jnp.float32, causal=False, sm_scale=0.3, bq=16)),
    ("causal_gqa_ragged_f16", dict(B=1, S=40, Hq=4, Hkv=2, D=64, dtype=jnp.float16, bq=16, bk=16)),
]


@pytest.mark.parametrize("seed,name,kw", [(i, n, kw) for i, (n, kw) in enumerate(CASES)], ids=[n for n, _ in CASES])
def test_flash_attention_fwd_bwd(seed, name, kw):
    _check(seed + 17, **kw)


def test_block_errs_ok_catches_a_missing_block():
    # A q block that never receives its contributions must fail even though the
    # global relative error is small.
    ref = np.random.default_rng(3).standard_normal((2, 250, 4, 64))
    assert block_errs_ok(ref * (1 + 1e-4), ref, 1e-3)[0]
    out = ref.copy()
    out[1, 48:64, 2] = 0.0  # one 16-row block of one head
    assert rel_err(out, ref) < 0.1
    ok, bad = block_errs_ok(out, ref, 1e-3)
    assert not ok and bad == [[1, 3, 2]]


def test_flash_attention_default_blocks_cross_lengths():
    # Default block sizes and S != T (non-causal cross attention), fwd only.
    _check(99, B=1, S=40, Hq=2, Hkv=1, D=64, dtype=jnp.float32, causal=False, bq=None, bk=None, T=72, grads=False)


def test_flash_attention_rejects_bad_heads():
    q, k, v, _ = _inputs(0, 1, 16, 3, 2, 64, jnp.float32)
    with pytest.raises(ValueError):
        flash_attention(q, k, v)


DECODE_CASES = [
    # B, Sq, Hq, Hkv, T, D, window, splits, dtype
    (2, 1, 4, 2, 256, 64, None, None, jnp.float32),
    (1, 4, 8, 1, 200, 64, 50, 3, jnp.float32),  # MQA, window, T % 16 != 0
    (2, 3, 2, 2, 128, 128, None, 2, jnp.bfloat16),
    (1, 16, 4, 2, 512, 64, 100, None, jnp.bfloat16),
    (1, 16, 8, 1, 128, 64, None, 2, jnp.float32),  # 128 rows: 2 row tiles
]


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_attention(case):
    B, Sq, Hq, Hkv, T, D, W, splits, dtype = case
    seed = T + Sq
    q, k, v, _ = _inputs(seed, B, Sq, Hq, Hkv, D, dtype, T=T)
    last = jax.random.randint(jax.random.PRNGKey(seed), (B, 1), Sq, T)
    pos = (last - Sq + jnp.arange(Sq)[None, :]).astype(jnp.int32)
    out = decode_attention(q, k, v, pos, sliding_window=W, num_splits=splits)
    ref = decode_attention_reference(q, k, v, pos, sliding_window=W)
    assert out.shape == q.shape and out.dtype == q.dtype
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    assert rel_err(out, ref) < tol


def test_decode_matches_flash_last_rows():
    # Decoding the last Sq tokens of a causal prefix equals prefill's last rows.
    q, k, v, _ = _inputs(5, 1, 64, 4, 2, 64, jnp.float32)
    full = flash_attention(q, k, v, causal=True, block_q=32, block_k=32)
    pos = jnp.arange(58, 64, dtype=jnp.int32)[None]
    dec = decode_attention(q[:, 58:], k, v, pos)
    assert rel_err(dec, full[:, 58:]) < 1e-4


# ------------------------------------------------------------------ GPU --
@pytest.mark.parametrize(
    "S,causal,window,Hq,Hkv",
    [(1024, True, None, 8, 8), (4096, True, None, 8, 2), (2048, False, None, 4, 4), (4096, True, 1024, 8, 8)],
)
@gpu[0]
@gpu[1]
def test_gpu_flash_attention_fwd(S, causal, window, Hq, Hkv):
    _check(
        S + Hq,
        B=2,
        S=S,
        Hq=Hq,
        Hkv=Hkv,
        D=128,
        dtype=jnp.bfloat16,
        causal=causal,
        window=window,
        bq=None,
        bk=None,
        grads=False,
    )


@pytest.mark.parametrize(
    "S,D,window,seg,Hkv",
    [(1024, 128, None, False, 2), (2048, 64, None, False, 4), (1000, 128, 256, False, 4), (1024, 128, None, True, 4)],
)
@gpu[0]
@gpu[1]
def test_gpu_flash_attention_fwd_bwd(S, D, window, seg, Hkv):
    _check(S + D, B=2, S=S, Hq=4, Hkv=Hkv, D=D, dtype=jnp.bfloat16, window=window, seg=seg, bq=None, bk=None)


@gpu[0]
@gpu[1]
def test_gpu_flash_attention_fwd_bwd_fp16_full_mqa():
    # fp16, no causal mask, 8 q heads summed into one kv head's dk/dv.
    _check(2056, B=2, S=2048, Hq=8, Hkv=1, D=128, dtype=jnp.float16, causal=False, bq=None, bk=None)


@gpu[0]
@gpu[1]
def test_gpu_decode_attention():
    for B, Sq, T, W in [(4, 1, 8192, None), (2, 8, 4096, 1024)]:
        q, k, v, _ = _inputs(T, B, Sq, 32, 8, 128, jnp.bfloat16, T=T)
        last = jax.random.randint(jax.random.PRNGKey(T), (B, 1), Sq, T)
        pos = (last - Sq + jnp.arange(Sq)[None, :]).astype(jnp.int32)
        out = decode_attention(q, k, v, pos, sliding_window=W)
        ref = decode_attention_reference(q, k, v, pos, sliding_window=W)
        assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize(
    "causal,window,seg,Hkv,dtype",
    [(True, None, False, 2, jnp.bfloat16), (False, None, False, 1, jnp.float16), (True, 48, True, 4, jnp.bfloat16)],
)
def test_fwd_bwd_lower_to_triton(monkeypatch, causal, window, seg, Hkv, dtype):
    """The compiled path without a GPU: forward and both backward kernels lower
    to Triton IR for CUDA (a non-causal backward once failed only there)."""
    from triton_lowering import TRITON_CALL, lower_for_cuda

    B, S, Hq, D = 2, 200, 8, 128
    sq = jax.ShapeDtypeStruct((B, S, Hq, D), dtype)
    skv = jax.ShapeDtypeStruct((B, S, Hkv, D), dtype)
    segment_ids = jnp.zeros((B, S), jnp.int32) if seg else None

    def f(q, k, v, do):
        out, vjp = jax.vjp(
            lambda q, k, v: flash_attention(q, k, v, causal=causal, sliding_window=window, segment_ids=segment_ids),
            q,
            k,
            v,
        )
        return out, vjp(do)

    text = lower_for_cuda(monkeypatch, "pallas_kernels.flash_attention", f, sq, skv, skv, sq)
    assert text.count(TRITON_CALL) == 3  # fwd, dq, dkdv

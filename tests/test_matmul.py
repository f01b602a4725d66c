"""Tiled bf16 matmul and int8 weight-only matmul vs. fp32 references.

CPU: Pallas interpret mode (``interpret=True``; output buffers start as NaN, so
an unwritten tile fails the finiteness check).  GPU (``-m gpu``): compiled.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.matmul import int8_matmul, matmul
from pallas_kernels.reference import int8_matmul_reference, matmul_reference

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(
    not ON_GPU, reason=f"needs a CUDA GPU (compiled Triton kernels); default backend is {jax.default_backend()!r}"
)


def rel_err(out, ref):
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "non-finite values (unwritten tile?)"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _ab(seed, M, N, K, dtype=jnp.bfloat16):
    ka, kb = jax.random.split(jax.random.PRNGKey(seed))
    return (
        jax.random.normal(ka, (M, K), jnp.float32).astype(dtype),
        jax.random.normal(kb, (K, N), jnp.float32).astype(dtype),
    )


def _w8(seed, K, N):
    kw, ks = jax.random.split(jax.random.PRNGKey(seed + 7))
    w = jax.random.randint(kw, (K, N), -127, 128, jnp.int32).astype(jnp.int8)
    s = jax.random.uniform(ks, (N,), jnp.float32, 1e-3, 2e-2)
    return w, s


# bf16 output rounding alone is ~2e-3 relative; fp32 accumulate keeps us there
@pytest.mark.parametrize(
    "M,N,K,blocks",
    [
        (64, 64, 64, (32, 32, 32)),
        (100, 70, 90, (32, 32, 32)),  # ragged everything
        (16, 96, 160, (16, 32, 64)),  # skinny decode-like
        (130, 48, 200, (64, 16, 64)),  # several k steps, grouped ids, ragged
    ],
)
def test_matmul_interpret(M, N, K, blocks):
    a, b = _ab(M * N + K, M, N, K)
    bm, bn, bk = blocks
    out = matmul(a, b, block_m=bm, block_n=bn, block_k=bk, interpret=True)
    assert out.shape == (M, N) and out.dtype == jnp.bfloat16
    assert rel_err(out, matmul_reference(a, b)) < 1e-2


def test_matmul_f32_out_and_fp32_inputs():
    a, b = _ab(3, 48, 40, 72, jnp.float32)
    out = matmul(a, b, block_m=16, block_n=16, block_k=32, interpret=True, out_dtype=jnp.float32)
    assert out.dtype == jnp.float32
    assert rel_err(out, matmul_reference(a, b)) < 1e-5


@pytest.mark.parametrize(
    "M,N,K,blocks",
    [
        (16, 64, 128, (16, 32, 64)),
        (50, 72, 100, (32, 32, 32)),  # ragged
    ],
)
def test_int8_matmul_interpret(M, N, K, blocks):
    x, _ = _ab(M + K, M, N, K)
    w, s = _w8(M, K, N)
    bm, bn, bk = blocks
    out = int8_matmul(x, w, s, block_m=bm, block_n=bn, block_k=bk, interpret=True)
    assert out.shape == (M, N) and out.dtype == x.dtype
    assert rel_err(out, int8_matmul_reference(x, w, s)) < 1e-2


# Every M a model can produce (decode 1..16, ragged prefills such as 77 tokens, big prefills) against
# odd K and N: blocks stay powers of two, operands are padded.
ODD = [(1, 64, 48), (3, 100, 70), (17, 96, 160), (77, 192, 172), (130, 48, 200)]


@pytest.mark.parametrize("M,N,K", ODD)
def test_odd_shapes_interpret(M, N, K):
    a, b = _ab(M + 2 * N + K, M, N, K)
    w, s = _w8(M + N, K, N)
    out = matmul(a, b, interpret=True)
    assert out.shape == (M, N) and rel_err(out, matmul_reference(a, b)) < 1e-2
    out = int8_matmul(a, w, s, interpret=True)
    assert out.shape == (M, N) and rel_err(out, int8_matmul_reference(a, w, s)) < 1e-2


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_split_k_interpret(splits):
    a, b = _ab(5, 4, 40, 256)
    w, s = _w8(5, 256, 40)
    kw = dict(block_k=64, splits=splits, interpret=True)
    assert rel_err(matmul(a, b, **kw), matmul_reference(a, b)) < 1e-2
    assert rel_err(int8_matmul(a, w, s, **kw), int8_matmul_reference(a, w, s)) < 1e-2


@pytest.mark.parametrize("M", [1, 16, 77, 300])
def test_lowers_to_triton_any_m(monkeypatch, M):
    """The compiled path for CUDA, without a GPU: a 77-row prefill used to stop the Triton lowering
    ("size is a power of 2, encountered (80, 64)")."""
    from triton_lowering import TRITON_CALL, lower_for_cuda

    mod = importlib.import_module("pallas_kernels.matmul")
    S = jax.ShapeDtypeStruct
    x, w = S((M, 192), jnp.bfloat16), S((192, 172), jnp.bfloat16)
    assert TRITON_CALL in lower_for_cuda(monkeypatch, "pallas_kernels.matmul", lambda a, b: mod.matmul(a, b), x, w)
    w8, s = S((192, 172), jnp.int8), S((172,), jnp.float32)
    text = lower_for_cuda(monkeypatch, "pallas_kernels.matmul", lambda a, b, c: mod.int8_matmul(a, b, c), x, w8, s)
    assert TRITON_CALL in text


def test_cpu_fallbacks_match():
    a, b = _ab(11, 33, 20, 40)
    w, s = _w8(11, 40, 20)
    assert rel_err(matmul(a, b), matmul_reference(a, b)) < 1e-2
    assert rel_err(int8_matmul(a, w, s), int8_matmul_reference(a, w, s)) < 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("M,N,K", [(4096, 4096, 4096), (1000, 3000, 2000), (16, 8192, 4096), *ODD])
def test_gpu_matmul(M, N, K):
    a, b = _ab(M + N, M, N, K)
    assert rel_err(matmul(a, b), matmul_reference(a, b)) < 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("M,N,K", [(16, 8192, 4096), (512, 4096, 4096), *ODD, (1, 2560, 2048), (77, 11264, 2048)])
def test_gpu_int8_matmul(M, N, K):
    x, _ = _ab(M, M, N, K)
    w, s = _w8(M, K, N)
    assert rel_err(int8_matmul(x, w, s), int8_matmul_reference(x, w, s)) < 1e-2

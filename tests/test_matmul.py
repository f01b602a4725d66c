"""Tiled bf16 matmul and int8 weight-only matmul vs. fp32 references.

CPU: Pallas interpret mode (``interpret=True``; output buffers start as NaN, so
an unwritten tile fails the finiteness check).  GPU (``-m gpu``): compiled.
"""

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


def test_cpu_fallbacks_match():
    a, b = _ab(11, 33, 20, 40)
    w, s = _w8(11, 40, 20)
    assert rel_err(matmul(a, b), matmul_reference(a, b)) < 1e-2
    assert rel_err(int8_matmul(a, w, s), int8_matmul_reference(a, w, s)) < 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("M,N,K", [(4096, 4096, 4096), (1000, 3000, 2000), (16, 8192, 4096)])
def test_gpu_matmul(M, N, K):
    a, b = _ab(M + N, M, N, K)
    assert rel_err(matmul(a, b), matmul_reference(a, b)) < 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("M,N,K", [(16, 8192, 4096), (512, 4096, 4096)])
def test_gpu_int8_matmul(M, N, K):
    x, _ = _ab(M, M, N, K)
    w, s = _w8(M, K, N)
    assert rel_err(int8_matmul(x, w, s), int8_matmul_reference(x, w, s)) < 1e-2

"""Group-wise int4 weight-only matmul vs. its fp32 reference (pallas_kernels/reference.py).

CPU: Pallas interpret mode over odd shapes, the XLA fallback, the packing round trip, and the
compiled path lowered for CUDA without a GPU (tests/triton_lowering.py). GPU (``-m gpu``): compiled.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.int4_matmul import int4_matmul, pack_int4, unpack_int4
from pallas_kernels.reference import int4_matmul_reference

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason=f"needs a CUDA GPU; default backend is {jax.default_backend()!r}")


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "non-finite values (unwritten tile?)"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _problem(seed, M, K, N, G, dtype=jnp.bfloat16):
    kx, kq, ks, ko = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(dtype)
    q = jax.random.randint(kq, (K, N), 0, 16).astype(jnp.uint8)
    s = jax.random.uniform(ks, (K // G, N), jnp.float32, 1e-3, 2e-2).astype(jnp.float16)
    o = (-jax.random.uniform(ko, (K // G, N), jnp.float32, 6, 9) * s.astype(jnp.float32)).astype(jnp.float16)
    return x, pack_int4(q, G), s, o, q


def test_pack_round_trip_and_layout():
    q = jnp.arange(64 * 3, dtype=jnp.int32).reshape(64, 3) % 16
    packed = pack_int4(q.astype(jnp.uint8), 32)
    assert packed.shape == (32, 3) and packed.dtype == jnp.uint8
    assert (unpack_int4(packed, 32) == q).all()
    # byte row j of a group: row j low, row j + 16 high
    assert int(packed[1, 0]) == int(q[1, 0]) | (int(q[17, 0]) << 4)


# bf16 output rounding alone is ~2e-3 relative
@pytest.mark.parametrize(
    "M,K,N,G",
    [
        (1, 64, 48, 32),  # decode GEMV, N not a multiple of any block
        (5, 128, 130, 64),  # ragged N, split-K over 2 groups
        (77, 256, 200, 128),  # the 77-token prefill
        (130, 96, 40, 32),  # several row tiles
    ],
)
def test_int4_matmul_interpret(M, K, N, G):
    x, p, s, o, _ = _problem(M + K + N, M, K, N, G)
    out = int4_matmul(x, p, s, o, group_size=G, interpret=True)
    assert out.shape == (M, N) and out.dtype == x.dtype
    assert rel_err(out, int4_matmul_reference(x, p, s, o, G)) < 1e-2


@pytest.mark.parametrize("splits", [1, 4])
def test_int4_split_k_and_fp32(splits):
    x, p, s, o, _ = _problem(3, 4, 128, 32, 32, jnp.float32)
    out = int4_matmul(x, p, s, o, group_size=32, splits=splits, interpret=True, out_dtype=jnp.float32)
    assert rel_err(out, int4_matmul_reference(x, p, s, o, 32)) < 1e-5


def test_xla_fallback_matches():
    x, p, s, o, _ = _problem(9, 7, 128, 24, 64)
    assert rel_err(int4_matmul(x, p, s, o, group_size=64), int4_matmul_reference(x, p, s, o, 64)) < 1e-2


def test_bad_inputs():
    x, p, s, o, _ = _problem(1, 2, 64, 16, 32)
    with pytest.raises(ValueError, match="group_size"):
        int4_matmul(x, p, s, o, group_size=48)
    with pytest.raises(ValueError, match="scales"):
        int4_matmul(x, p, s[:1], o[:1], group_size=32)


@pytest.mark.parametrize("M", [1, 77, 300])
def test_lowers_to_triton(monkeypatch, M):
    from triton_lowering import TRITON_CALL, lower_for_cuda

    mod = importlib.import_module("pallas_kernels.int4_matmul")
    S = jax.ShapeDtypeStruct
    args = (S((M, 192), jnp.bfloat16), S((96, 172), jnp.uint8), S((3, 172), jnp.float16), S((3, 172), jnp.float16))
    f = lambda x, p, s, o: mod.int4_matmul(x, p, s, o, group_size=64)
    assert TRITON_CALL in lower_for_cuda(monkeypatch, "pallas_kernels.int4_matmul", f, *args)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "M,K,N,G",
    [
        (1, 64, 48, 32),
        (3, 192, 172, 64),
        (77, 256, 200, 128),
        (1, 2048, 2560, 128),
        (16, 5632, 2048, 128),
        (77, 2048, 11264, 128),
        (512, 2048, 2048, 128),
        (1000, 4096, 3000, 128),
    ],
)
def test_gpu_int4_matmul(M, K, N, G):
    x, p, s, o, _ = _problem(M + N, M, K, N, G)
    assert rel_err(int4_matmul(x, p, s, o, group_size=G), int4_matmul_reference(x, p, s, o, G)) < 1e-2

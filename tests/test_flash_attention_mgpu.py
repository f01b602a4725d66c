"""The Mosaic GPU (FlashAttention-3 style) kernel: pallas_kernels/flash_attention_mgpu.py.

On CPU the kernels run under Pallas' GPU interpreter, which simulates the three warpgroups,
TMA copies and barriers (it checks that every barrier phase is observed by every thread), with
the wgmma tiles as plain dots; and they lower to Mosaic GPU MLIR for CUDA. On the H100
(`-m gpu`) they compile and run, forward and gradients against the fp32 reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from test_flash_attention import _check, _inputs, _reference, block_errs_ok, gpu, rel_err

from pallas_kernels import flash_attention_mgpu as fm
from pallas_kernels.flash_attention import flash_attention

MOSAIC_CALL = "stablehlo.custom_call @mosaic_gpu"


@pytest.fixture
def interpret(monkeypatch):
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    monkeypatch.setattr(fm, "_INTERPRET", InterpretGPUParams())


@pytest.mark.parametrize("S,Hq,Hkv,causal", [(256, 2, 1, True), (128, 2, 2, False)])
def test_interpreted_fwd_bwd(interpret, S, Hq, Hkv, causal):
    """Pipeline, masking, GQA head loop and the causal skip/diagonal/full split, on CPU."""
    q, k, v, do = _inputs(S, 1, S, Hq, Hkv, 64, jnp.bfloat16)
    out, vjp = jax.vjp(lambda q, k, v: fm.mgpu_flash_attention(q, k, v, causal=causal), q, k, v)
    ref, rgrads = _reference(S, 1, S, Hq, Hkv, 64, jnp.bfloat16, None, causal, None, False, None)
    assert rel_err(out, ref) < 2e-2
    for name, g, rg in zip("qkv", vjp(do), rgrads):
        assert rel_err(g, rg) < 4e-2, f"d{name}"
        ok, bad = block_errs_ok(g, rg, 0.2)
        assert ok, f"d{name}: (batch, row block, head) out of tolerance: {bad}"


@pytest.mark.parametrize("causal,Hkv,D,dtype", [(True, 2, 128, jnp.bfloat16), (False, 1, 64, jnp.float16)])
def test_lowers_to_mosaic_gpu(causal, Hkv, D, dtype):
    """Forward, dq and dk/dv trace and lower to Mosaic GPU kernels for CUDA without a GPU."""
    sq = jax.ShapeDtypeStruct((2, 512, 4, D), dtype)
    skv = jax.ShapeDtypeStruct((2, 512, Hkv, D), dtype)

    def f(q, k, v, do):
        out, vjp = jax.vjp(lambda q, k, v: fm.mgpu_flash_attention(q, k, v, causal=causal), q, k, v)
        return out, vjp(do)

    checks = [export.DisabledSafetyCheck.custom_call(n) for n in ("mosaic_gpu", "mosaic_gpu_v2")]
    text = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(sq, skv, skv, sq).mlir_module()
    assert text.count(MOSAIC_CALL) == 3  # forward, dq, dk/dv


def test_supported_and_errors():
    q = jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
    k = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    assert fm.supported(q, k, k)
    assert not fm.supported(q, k, k, sliding_window=64)
    assert not fm.supported(q[:, :200], k[:, :200], k[:, :200])  # not a multiple of 128
    assert not fm.supported(q.astype(jnp.float32), k.astype(jnp.float32), k.astype(jnp.float32))
    with pytest.raises(ValueError, match="Mosaic GPU kernel"):
        fm.mgpu_flash_attention(q[:, :200], k[:, :200], k[:, :200])
    if not fm.available():
        with pytest.raises(ValueError, match="Hopper"):
            flash_attention(q, k, k, backend="mosaic")


# ------------------------------------------------------------------ GPU --
@pytest.mark.parametrize(
    "S,Hq,Hkv,D,dtype,causal",
    [
        (1024, 8, 2, 128, jnp.bfloat16, True),
        (4096, 8, 8, 128, jnp.bfloat16, True),
        (384, 4, 1, 64, jnp.bfloat16, True),
        (2048, 4, 4, 64, jnp.float16, False),
        (1152, 8, 1, 128, jnp.float16, False),
    ],
)
@gpu[0]
@gpu[1]
def test_gpu_mgpu_fwd_bwd(S, Hq, Hkv, D, dtype, causal):
    assert fm.available(), "the H100 runs the Mosaic GPU kernel"
    _check(S + D + Hkv, B=2, S=S, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype, causal=causal, bq=None, bk=None, backend="mosaic")


@gpu[0]
@gpu[1]
def test_gpu_auto_backend_picks_mosaic_when_it_fits():
    q, k, v, _ = _inputs(0, 1, 1024, 4, 2, 128, jnp.bfloat16)
    hlo = lambda **kw: jax.jit(lambda q, k, v: flash_attention(q, k, v, **kw)).lower(q, k, v).as_text()
    assert "mosaic_gpu" in hlo()
    assert "mosaic_gpu" not in hlo(sliding_window=128)  # the Triton kernel takes windows
    np.testing.assert_allclose(
        np.asarray(flash_attention(q, k, v), np.float32),
        np.asarray(flash_attention(q, k, v, backend="triton"), np.float32),
        atol=2e-2,
    )

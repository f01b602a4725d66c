"""Lower a Pallas kernel's compiled (Triton) path to MLIR for CUDA on a machine without a GPU.

Catches what interpret mode cannot: primitives or type mixes the Triton lowering rejects.
"""

import importlib

import jax
from jax import export

TRITON_CALL = "__gpu$xla.gpu.triton"


def lower_for_cuda(monkeypatch, module: str, f, *args) -> str:
    """MLIR text of jit(f)(*args) exported for CUDA, with `module`'s kernels compiled (not interpreted)."""
    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, "resolve_interpret", lambda interpret: False)
    try:  # newer jax asks the device for its compute capability: pin an H100
        from jax._src.pallas.triton import gpu_info

        h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
        monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: h100)
    except (ImportError, AttributeError):
        pass
    exp = export.export(
        jax.jit(f), platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    )(*args)
    return exp.mlir_module()

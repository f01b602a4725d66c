"""Small shims over Pallas API differences between the jax versions we support.

We run on jax 0.10.x (CPU, Pallas interpret mode, CI) and jax 0.11.x (GPU,
compiled through the Triton lowering).  The pieces that moved between releases:

* the Triton compiler-params class was ``plgpu.TritonCompilerParams`` in older
  releases and is ``plgpu.CompilerParams`` in newer ones;
* ``pl.BlockSpec`` took ``(index_map, block_shape)`` before jax 0.4.31 and
  ``(block_shape, index_map)`` after; we always pass keywords so either works.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_CompilerParams = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams


def triton_params(num_warps: int, num_stages: int):
    """Compiler params for the Triton lowering (ignored in interpret mode)."""
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def block_spec(block_shape, index_map) -> pl.BlockSpec:
    """Version-independent BlockSpec constructor (keywords, never positional)."""
    return pl.BlockSpec(block_shape=block_shape, index_map=index_map)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def resolve_interpret(interpret: bool | None) -> bool:
    """``None`` -> interpret unless the default backend is a GPU.

    On a non-GPU backend the compiled Triton path cannot run at all, so we also
    interpret there when the caller passed ``False`` (tests and CPU fallbacks).
    """
    if not on_gpu():
        return True
    return bool(interpret)


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())

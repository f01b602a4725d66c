"""Pallas kernels for smedjan: flash attention, decode attention, matmuls.

All kernels run compiled (Triton lowering) on GPU and in Pallas interpret mode
elsewhere, so the same code paths are exercised by the CPU test-suite.
"""

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.matmul import int8_matmul, matmul

__all__ = ["flash_attention", "decode_attention", "matmul", "int8_matmul"]

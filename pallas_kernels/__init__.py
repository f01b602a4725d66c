"""Pallas kernels for smedjan: flash attention, decode attention, matmuls.

All kernels run compiled (Triton lowering) on GPU and in Pallas interpret mode
elsewhere, so the same code paths are exercised by the CPU test-suite.
"""
from pallas_kernels.flash_attention import flash_attention

__all__ = ["flash_attention"]

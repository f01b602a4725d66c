"""Every backend-dependent choice in one frozen object, resolved once per backend.

The model, the trainer and the decoder take a `Backend` and read its fields; nothing below this
module asks `jax.default_backend()` at trace time or keeps a module global that changes what a
traced function does. It is hashable, so it is passed to `jit` as a static argument, and tests
build one explicitly (`Backend(...)` or `settings(platform, field=value)`).

Each default is the fastest measured choice for its platform (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from smedjan.errors import UserError
from smedjan.hardware import xla_only

ATTN_IMPLS = ("xla", "cudnn", "pallas")
DECODE_IMPLS = ("xla", "cudnn", "pallas", "pallas_fused")


@dataclass(frozen=True)
class Backend:
    platform: str = "cpu"
    # q/k/v and gate/up joined into one GEMM each. H100: the 125m step 36.5 -> 33.4 ms; on CPU XLA runs
    # the separate GEMMs faster (the main job's step 3-10% slower joined).
    fuse_projections: bool = False
    # The loss's log-sum-exp in one variadic-reduce pass (H100: 0.89 ms against 0.69 + 0.69 at
    # 16384 x 32000); XLA:CPU runs the two plain passes faster (2-8% of the step).
    one_pass_lse: bool = False
    # Training and prefill attention. Hopper: the Mosaic GPU flash kernel beats cuDNN for training shapes
    # (fwd+bwd 1.15x at 125m's S=1024 D=64); other GPUs: cuDNN; elsewhere XLA.
    attn_impl: str = "xla"
    # Attention of a decode step. GPU: the fused Pallas decode-layer kernel (rope, cache write and
    # attention in one kernel; 1b batch-1 on the H100: 72% of the bandwidth bound against 66% for XLA).
    decode_impl: str = "xla"
    # `lax.scan` unroll of the layer stack: fully unrolled on GPU (the step runs as one CUDA graph:
    # 125m train +13%, small forward +46% on the H100), rolled elsewhere where compile time matters.
    scan_unroll: int | bool = 1
    # Decode steps per early-exit check of the on-device loop: a GPU while loop copies its condition
    # to the host every iteration; on CPU that costs nothing and a chunk's steps past the end are waste.
    decode_chunk: int = 1
    # Run the Pallas kernels in interpret mode (everywhere but a GPU, where they compile through Triton).
    interpret: bool = True

    def replace(self, **changes) -> Backend:
        return dataclasses.replace(self, **changes).validate()

    def validate(self) -> Backend:
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attention impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.decode_impl not in DECODE_IMPLS:
            raise ValueError(f"decode attention impl must be one of {DECODE_IMPLS}, got {self.decode_impl!r}")
        return self

    @property
    def prefill_impl(self) -> str:
        """Prefill attention: the training kernel, except that interpreted Pallas is far too slow to serve."""
        return "xla" if self.attn_impl == "pallas" and self.interpret else self.attn_impl


def _gpu_attn_impl() -> str:
    from pallas_kernels.flash_attention_mgpu import available

    return "pallas" if available() else "cudnn"


def settings(platform: str | None = None, **overrides) -> Backend:
    """The settings for `platform` (default: jax's default backend), with `overrides` applied.

    `platform` is the hook for backends with their own rules (e.g. Apple's METAL: XLA only).
    An override of "auto" for attn_impl / decode_impl means the platform's default.
    """
    import jax

    platform = (platform or jax.default_backend()).lower()
    if platform in ("gpu", "cuda", "rocm"):
        base = Backend(
            platform="gpu",
            fuse_projections=True,
            one_pass_lse=True,
            attn_impl=_gpu_attn_impl(),
            decode_impl="pallas_fused",
            scan_unroll=True,
            decode_chunk=16,
            interpret=False,
        )
    else:
        base = Backend(platform=platform)  # CPU and Apple's METAL: XLA everywhere
    overrides = {k: v for k, v in overrides.items() if v is not None and v != "auto"}
    if xla_only(platform):
        kernels = {k: v for k, v in overrides.items() if k in ("attn_impl", "decode_impl") and v != "xla"}
        if kernels:
            name, impl = next(iter(kernels.items()))
            raise UserError(
                f"{name} {impl!r} is not available on Apple's Metal backend: the Pallas and cuDNN kernels are "
                "CUDA-only, every path runs XLA there (use auto or xla)"
            )
    return base.replace(**overrides)

"""What the code runs on: the jax platform (Apple's Metal plugin handled), accelerator peak FLOP/s.

Apple GPUs run through the `jax-metal` PJRT plugin (`pip install "smedjan[metal]"`). Its last
release was built against an older jaxlib than the one smedjan needs, and a plugin that fails to
load beside the installed jaxlib makes jax raise on first use (or log a traceback). `start_platform()`
turns that into one line on stderr and a run on the CPU. On Metal every model path uses the XLA
implementations: the Pallas kernels are written for CUDA GPUs (see `xla_only`).
"""

from __future__ import annotations

import logging
import sys
from importlib import metadata

METAL = "metal"
METAL_PACKAGE = "jax-metal"

# Dense bf16 FLOP/s per device, from the vendors' data sheets (SXM parts; without sparsity).
PEAK_FLOPS = {
    "GH200": 989e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
}


def peak_flops_for(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device named `device_kind` (jax's Device.device_kind), or None."""
    kind = (device_kind or "").lower()
    for name, value in PEAK_FLOPS.items():
        if name.lower() in kind:
            return value
    return None


def xla_only(platform: str) -> bool:
    """True where the Pallas kernels (Triton / Mosaic GPU) cannot run: Apple's Metal plugin."""
    return platform.lower() == METAL


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def metal_fallback_message(reason: str) -> str:
    """The one line printed when jax-metal is installed but does not load."""
    jaxlib, plugin = _version("jaxlib"), _version(METAL_PACKAGE)
    wants = [r for r in (metadata.requires(METAL_PACKAGE) or []) if r.startswith("jaxlib")] if plugin else []
    built = f" (it requires {wants[0].replace(' ', '')})" if wants else ""
    reason = " ".join(str(reason).split())[:200]
    return (
        f"smedjan: {METAL_PACKAGE} {plugin or '?'}{built} did not load beside jaxlib {jaxlib}: {reason}; "
        f"running on CPU (pip uninstall {METAL_PACKAGE} to silence this)"
    )


def metal_installed() -> bool:
    return _version(METAL_PACKAGE) is not None


_started: str | None = None


def start_platform() -> str:
    """Initialise jax's backends once and return the platform, lower case (cpu, gpu, tpu, metal).

    If the Metal plugin is installed but fails to initialise, print `metal_fallback_message` once
    and continue on the CPU instead of raising jax's RuntimeError.
    """
    global _started
    if _started is not None:
        return _started
    import jax
    from jax._src import xla_bridge

    plugin = _version(METAL_PACKAGE)
    quiet = logging.getLogger(xla_bridge.__name__)
    level = quiet.level
    if plugin:  # a failing plugin's initialize() is logged with a traceback: we print one line instead
        quiet.setLevel(logging.CRITICAL)
    try:
        platform = jax.default_backend().lower()
        failure = None
        asked = jax.config.jax_platforms or ""
        if plugin and platform != METAL and (not asked or METAL in asked.lower()):
            failure = getattr(xla_bridge, "_backend_errors", {}).get("METAL") or "the plugin registered no device"
    except RuntimeError as e:
        if not plugin or "METAL" not in str(e).upper():
            raise
        failure = str(e).split(" (you may need")[0]
        jax.config.update("jax_platforms", "cpu")
        xla_bridge._clear_backends()
        platform = jax.default_backend().lower()
    finally:
        quiet.setLevel(level)
    if failure:
        print(metal_fallback_message(failure), file=sys.stderr)
    _started = platform
    return platform

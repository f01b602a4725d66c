"""Google's tokamax attention as a peer for the attention benchmarks.

tokamax needs Python >= 3.12; on the GPU machine install it offline first with
`source benchmarks/peers/install_tokamax.sh` (see that file).
"""

from __future__ import annotations


def make_tokamax_attention(causal: bool, implementation: str = "mosaic"):
    """Returns f(q, k, v) -> out via `tokamax.dot_product_attention`.

    q: [B, S, Hq, D], k/v: [B, S, Hkv, D] (BTNH, as `jax.nn.dot_product_attention`);
    GQA (Hq % Hkv == 0) is handled by tokamax itself. `implementation` is one of
    "mosaic" (Pallas Mosaic GPU, sm80/sm90/sm100), "triton", "cudnn", "xla",
    "xla_chunked"; an unsupported platform/shape raises NotImplementedError at call.
    """
    try:
        import tokamax
    except (ImportError, SyntaxError) as e:  # SyntaxError: Python < 3.12
        raise ImportError(
            "tokamax is not importable (needs Python >= 3.12; offline install: "
            f"`source benchmarks/peers/install_tokamax.sh`): {e!r}"
        ) from e

    def f(q, k, v):
        return tokamax.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)

    return f

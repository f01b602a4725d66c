"""Q4_K and Q6_K blocks (llama.cpp's k-quants), which the `gguf` package can read but not write.

Round-to-nearest within each block, in the exact byte layout of ggml's `block_q4_K` / `block_q6_K`
(checked against `gguf.quants.dequantize` in the tests). llama.cpp's own quantizer searches the
sub-block scales iteratively; this one takes min/max, so its error is somewhat larger but the file
is the same format.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _blocks(x: np.ndarray) -> np.ndarray:
    if x.shape[-1] % QK_K:
        raise ValueError(f"rows of {x.shape[-1]} values are not a multiple of {QK_K}")
    return x.astype(np.float32).reshape(-1, QK_K)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """[..., K] float -> [..., K / 256 * 144] uint8; 8 sub-blocks of 32, x = d·sc·q - dmin·m, q in 0..15."""
    b = _blocks(x).reshape(-1, 8, 32)
    lo = np.minimum(b.min(-1), 0.0)
    scale = (b.max(-1) - lo) / 15
    d = _f16(scale.max(-1) / 63)
    dmin = _f16(-lo.min(-1) / 63)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)), 0, 63).astype(np.uint8)
    m = np.clip(np.round(np.divide(-lo, dmin32, out=np.zeros_like(lo), where=dmin32 > 0)), 0, 63).astype(np.uint8)
    step = (d32 * sc)[..., None]
    q = np.divide(b + (dmin32 * m)[..., None], step, out=np.zeros_like(b), where=step > 0)
    q = np.clip(np.round(q), 0, 15).astype(np.uint8)
    scales = np.concatenate(
        [
            (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
            (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4),
        ],
        axis=-1,
    )
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # chunk j: sub-block 2j low, 2j+1 high nibbles
    out = np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), scales, qs], axis=-1)
    return out.reshape(*x.shape[:-1], -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """[..., K] float -> [..., K / 256 * 210] uint8; 16 sub-blocks of 16, x = d·sc·(q - 32), q in 0..63."""
    b = _blocks(x).reshape(-1, 16, 16)
    scale = np.abs(b).max(-1) / 31
    d = _f16(scale.max(-1) / 127)
    d32 = d.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)), 0, 127).astype(np.int8)
    step = (d32 * sc)[..., None]
    q = np.divide(b, step, out=np.zeros_like(b), where=step > 0)
    q = (np.clip(np.round(q), -32, 31) + 32).astype(np.uint8).reshape(-1, 8, 32)
    low, high = q & 15, q >> 4
    # Group g = 4h + 2·nibble + c of the block lives in ql[h·64 + c·32 + i] (nibble) and in
    # qh[h·32 + i] (bits 2·(g mod 4)), mirroring ggml's dequantize_row_q6_K.
    low = low.reshape(-1, 2, 2, 2, 32)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = high.reshape(-1, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d[:, None].view(np.uint8)], axis=-1)
    return out.reshape(*x.shape[:-1], -1)

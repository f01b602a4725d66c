"""Weight-only quantization of a model: every linear of the layers (and optionally the LM head) to
int8 per output channel or int4 per group, by round to nearest or with AWQ's activation-aware scales.

    smedjan quantize MODEL --scheme int4 --method awq --calib corpus.txt --out model-int4

The output is a HF folder whose config.json carries `quantization_config` with quant_method
"smedjan"; each quantized "<name>.weight" is stored as "<name>.qweight" / ".scales" (/ ".offsets",
".in_scale"), in the kernel layout of smedjan/quant/qweight.py, in quantized.safetensors (not
model.safetensors: transformers does not know this quant_method, so it must find no weights to load and
refuse, rather than load the folder with random layers); smedjan's generate / serve / chat / bench /
perplexity load it as they load any checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from smedjan.config import ModelConfig
from smedjan.errors import UserError
from smedjan.model.transformer import LAYER_PREFIX
from smedjan.quant.qweight import SCHEMES, quantize

METHODS = ("rtn", "awq")
LINEARS = tuple(
    LAYER_PREFIX + n
    for n in (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    )
)
NOTE = (
    "Weight-only quantization by smedjan (quant_method 'smedjan'): run it with smedjan (generate, serve, chat, "
    "bench, perplexity). transformers cannot load it: it does not know this quant_method (the weights are in "
    "quantized.safetensors, which it does not look for). Each quantized "
    "'<name>.weight' is stored as '<name>.qweight' (int8 [in, out], or uint8 [in/2, out] holding two 4-bit "
    "codes a byte: in each group of group_size input rows, row j in the low nibble and row j + group_size/2 in "
    "the high one), '<name>.scales' (int8: float32 [out]; int4: float16 [in/group_size, out]), for int4 "
    "'<name>.offsets' (float16, w = code * scale + offset), and with AWQ '<name>.in_scale' (float32 [in], "
    "multiplies the input)."
)


class QuantizeError(UserError):
    pass


def quantize_params(
    params: dict,
    cfg: ModelConfig,
    scheme: str,
    *,
    group_size: int = 128,
    method: str = "rtn",
    calib_tokens: np.ndarray | None = None,
    lm_head: bool = False,
    progress=None,
) -> tuple[dict, ModelConfig]:
    """(params with the linears replaced by QuantizedWeights, config). `lm_head` on a model that ties its
    head to the embedding unties them: the table stays float for the lookup, the head becomes a
    quantized copy (read every decode step, it is worth its bytes), and the config says untied."""
    if scheme not in SCHEMES:
        raise QuantizeError(f"--scheme must be one of {SCHEMES}, got {scheme!r}")
    if method not in METHODS:
        raise QuantizeError(f"--method must be one of {METHODS}, got {method!r}")
    if scheme == "int4" and (group_size < 32 or group_size & (group_size - 1)):
        raise QuantizeError(f"--group-size must be a power of two >= 32, got {group_size}")
    names = list(LINEARS)
    params = dict(params)
    if lm_head:
        if cfg.tie_word_embeddings:
            cfg = cfg.replace(tie_word_embeddings=False)
            params["lm_head.weight"] = params["model.embed_tokens.weight"]
        names.append("lm_head.weight")
    in_scales = {}
    if method == "awq":
        if calib_tokens is None:
            raise QuantizeError("--method awq needs calibration text (--calib FILE)")
        from smedjan.quant.awq import awq_scales

        in_scales = awq_scales(params, cfg, calib_tokens, scheme, group_size, progress=progress)
    for name in names:
        params[name] = quantize(params[name], scheme, group_size, in_scale=in_scales.get(name))
    return params, cfg


def quantization_config(scheme: str, group_size: int, method: str, lm_head: bool) -> dict:
    return {
        "quant_method": "smedjan",
        "scheme": scheme,
        "bits": 8 if scheme == "int8" else 4,
        "group_size": group_size if scheme == "int4" else None,
        "method": method,
        "modules": [n[: -len(".weight")] for n in LINEARS] + (["lm_head"] if lm_head else []),
        "note": NOTE,
    }


def calibration_tokens(path: str, tokenizer, rows: int, seq_len: int) -> np.ndarray:
    """[rows, seq_len] token ids from the start of a text corpus (fewer rows if it is short)."""
    from smedjan.text import expand_inputs, iter_documents

    ids: list[int] = []
    for doc in iter_documents(expand_inputs([path])):
        ids.extend(tokenizer.encode(doc))
        if len(ids) >= rows * seq_len:
            break
    n = min(rows, len(ids) // seq_len)
    if n == 0:
        raise QuantizeError(f"{path}: calibration text too short ({len(ids)} tokens, need at least {seq_len})")
    return np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len)


def quantize_folder(
    model: str,
    out: str | Path,
    scheme: str,
    *,
    group_size: int = 128,
    method: str = "rtn",
    calib: str | None = None,
    calib_rows: int = 16,
    calib_seq_len: int = 256,
    lm_head: bool = False,
    progress=None,
) -> Path:
    """Read a HF folder (or hub id), quantize it, write the quantized folder (tokenizer copied)."""
    from smedjan.checkpoint import load_hf, resolve_path, save_hf

    folder = resolve_path(model)
    cfg, params = load_hf(folder, dtype=jnp.float32)
    if any(hasattr(v, "linear") for v in params.values()):
        raise QuantizeError(f"{folder}: already quantized")
    tokens = None
    if method == "awq":
        if calib is None:
            raise QuantizeError("--method awq needs calibration text (--calib FILE)")
        from smedjan.tokenizer import Tokenizer

        tokens = calibration_tokens(
            calib, Tokenizer.from_dir(folder), calib_rows, min(calib_seq_len, cfg.max_position_embeddings)
        )
    qparams, cfg = quantize_params(
        params,
        cfg,
        scheme,
        group_size=group_size,
        method=method,
        calib_tokens=tokens,
        lm_head=lm_head,
        progress=progress,
    )
    return save_hf(
        out,
        cfg,
        qparams,
        tokenizer_dir=folder,
        quantization_config=quantization_config(scheme, group_size, method, lm_head),
    )

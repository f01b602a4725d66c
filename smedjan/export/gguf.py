"""GGUF files that llama.cpp runs: every tensor under llama.cpp's name, the architecture metadata
and the tokenizer embedded, written with the `gguf` package (llama.cpp's own Python writer).

    smedjan export runs/main_job/hf --format gguf --type q8_0 --out model.gguf

The conventions follow llama.cpp's `convert_hf_to_gguf.py`: Llama/Mistral checkpoints become the
`llama` architecture, whose RoPE rotates interleaved pairs while HF rotates halves, so the rows of
q_proj/k_proj are permuted per head (Qwen2/Qwen3 use llama.cpp's NEOX RoPE and stay as they are).
A byte-level BPE tokenizer is written as `gpt2` (tokens + merges), a SentencePiece-style one (BPE
with byte fallback, e.g. converted llama2.c models) as `llama` (tokens + scores); special tokens are
typed CONTROL and the chat template goes along.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from smedjan.config import ModelConfig
from smedjan.errors import UserError
from smedjan.model.transformer import LAYER_PREFIX

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# HF name (per-layer names without "model.layers.N.") -> GGUF name
TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "blk.{}.attn_norm.weight",
    "self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "self_attn.q_proj.bias": "blk.{}.attn_q.bias",
    "self_attn.k_proj.bias": "blk.{}.attn_k.bias",
    "self_attn.v_proj.bias": "blk.{}.attn_v.bias",
    "self_attn.o_proj.bias": "blk.{}.attn_output.bias",
    "self_attn.q_norm.weight": "blk.{}.attn_q_norm.weight",
    "self_attn.k_norm.weight": "blk.{}.attn_k_norm.weight",
    "post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
    "mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "mlp.down_proj.weight": "blk.{}.ffn_down.weight",
}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")


class GGUFError(UserError):
    """A checkpoint or tokenizer that cannot be written as (or read from) GGUF."""


# ---- Q/K row order -----------------------------------------------------------------------------
def permute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved-pair rows, per head (weights [out, in] or biases [out])."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_permuted(arch: str, hf_name: str, cfg: ModelConfig) -> int | None:
    """Heads to (un)permute `hf_name` over, or None when the tensor keeps HF's row order."""
    if arch != "llama":
        return None
    if hf_name.startswith("self_attn.q_proj."):
        return cfg.num_attention_heads
    if hf_name.startswith("self_attn.k_proj."):
        return cfg.num_key_value_heads
    return None


# ---- tensor types --------------------------------------------------------------------------------
def _quantizers() -> dict[str, tuple[int, Callable[[np.ndarray], np.ndarray]]]:
    """GGML type name -> (row multiple, quantize)."""
    import gguf

    from smedjan.export.kquants import QK_K, quantize_q4_k, quantize_q6_k

    T = gguf.GGMLQuantizationType

    def via_gguf(t):
        return lambda x: gguf.quants.quantize(x.astype(np.float32), t)

    return {
        "F32": (1, lambda x: x.astype(np.float32)),
        "F16": (1, lambda x: x.astype(np.float16)),
        "BF16": (1, via_gguf(T.BF16)),
        "Q8_0": (32, via_gguf(T.Q8_0)),
        "Q5_0": (32, via_gguf(T.Q5_0)),
        "Q4_0": (32, via_gguf(T.Q4_0)),
        "Q4_K": (QK_K, quantize_q4_k),
        "Q6_K": (QK_K, quantize_q6_k),
    }


# What llama.cpp uses when a row length does not fit the block size.
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0", "Q5_0": "F16", "Q8_0": "F16", "Q4_0": "F16"}


def tensor_type(gguf_name: str, ndim: int, ftype: str, layer: int | None, n_layers: int) -> str:
    """The GGML type of one tensor under a file type; 1-D tensors (norms, biases) always stay F32."""
    if ndim == 1 or ftype == "f32":
        return "F32"
    if ftype != "q4_k_m":
        return ftype.upper()
    # llama.cpp's Q4_K_M mix: more bits where quantization hurts most (the output head, attn_v and
    # ffn_down in the first and last eighth of the layers and every third layer in between).
    if gguf_name == "output.weight":
        return "Q6_K"
    if layer is not None and gguf_name.endswith(("attn_v.weight", "ffn_down.weight")):
        more = layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2
        return "Q6_K" if more else "Q4_K"
    return "Q4_K"


def encode_tensor(x: np.ndarray, kind: str) -> tuple[np.ndarray, str]:
    """(bytes or float array as stored, the GGML type actually used after fallbacks)."""
    quantizers = _quantizers()
    while x.shape[-1] % quantizers[kind][0]:
        kind = _FALLBACK[kind]
    return quantizers[kind][1](x), kind


# ---- tokenizer -------------------------------------------------------------------------------------
def _token_str(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def tokenizer_metadata(folder: Path, vocab_size: int) -> dict:
    """The GGUF tokenizer fields for the tokenizer.json (+ tokenizer_config.json) in `folder`."""
    import gguf

    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        raise GGUFError(f"{folder}: no tokenizer.json (GGUF embeds the tokenizer; llama.cpp needs one)")
    tj = json.loads(tj_path.read_text())
    cfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFError(f"{tj_path}: model type {model.get('type')!r}; GGUF export writes BPE tokenizers only")
    vocab: dict[str, int] = model["vocab"]
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    n = max([*vocab.values(), *added.keys()]) + 1
    if n > vocab_size:
        raise GGUFError(f"{tj_path}: {n} tokens but the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    meta: dict = {"tokens": tokens, "types": types}
    pre = tj.get("pre_tokenizer") or {}
    if model.get("byte_fallback"):  # SentencePiece BPE (Llama 1/2, llama2.c)
        meta["model"] = "llama"
        # llama.cpp's SPM tokenizer merges the adjacent pair whose result scores highest; a merge's
        # rank in tokenizer.json is exactly that order.
        scores = [0.0] * vocab_size
        for rank, m in enumerate(merges):
            piece = m.replace(" ", "")
            if piece in vocab and scores[vocab[piece]] == 0.0:
                scores[vocab[piece]] = -float(rank + 1)
        meta["scores"] = scores
        for text, i in vocab.items():
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types[i] = gguf.TokenType.BYTE
        unk = model.get("unk_token")
        if unk in vocab:
            types[vocab[unk]] = gguf.TokenType.UNKNOWN
        meta["add_space_prefix"] = "Prepend" in json.dumps(tj.get("normalizer"))
    elif pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        meta.update(model="gpt2", pre="gpt-2", merges=merges)  # GPT-2's split regex
    else:
        raise GGUFError(
            f"{tj_path}: pre-tokenizer {pre.get('type')!r} has no llama.cpp equivalent that smedjan knows "
            "(byte-level BPE with GPT-2's split, and SentencePiece-style BPE, are written)"
        )

    for key in ("bos", "eos", "unk", "pad"):
        text = _token_str(tcfg.get(f"{key}_token"))
        tid = vocab.get(text, next((i for i, t in added.items() if t["content"] == text), None))
        if tid is not None:
            meta[f"{key}_id"] = tid
    meta["add_bos"] = bool(tcfg.get("add_bos_token", _template_adds_bos(tj)))
    meta["add_eos"] = bool(tcfg.get("add_eos_token", False))
    template = tcfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if template:
        meta["chat_template"] = template
    return meta


def _template_adds_bos(tj: dict) -> bool:
    post = tj.get("post_processor") or {}
    return post.get("type") == "TemplateProcessing" and "SpecialToken" in json.dumps(post.get("single", [])[:1])


# ---- the file --------------------------------------------------------------------------------------
def _rope_metadata(writer, cfg: ModelConfig, arch: str):
    """RoPE scaling keys; llama3-style scaling travels as per-frequency factors (`rope_freqs.weight`)."""
    import gguf

    kind = cfg.rope_type
    if kind == "default":
        return None
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
        return None
    if kind == "llama3" and arch == "llama":
        from smedjan.model.rope import _base_inv_freq, inv_freq_and_scale

        base = np.asarray(_base_inv_freq(cfg.rope_theta, cfg.head_dim))
        scaled = np.asarray(inv_freq_and_scale(cfg)[0])
        return (base / scaled).astype(np.float32)  # llama.cpp divides each frequency by its factor
    raise GGUFError(f"rope_scaling of type {kind!r}: GGUF export writes plain, linear and llama3 RoPE only")


def write_gguf(
    out: str | os.PathLike,
    cfg: ModelConfig,
    params: dict,
    tokenizer_dir: str | os.PathLike,
    ftype: str = "f16",
    name: str = "smedjan model",
    progress: bool = False,
) -> dict[str, str]:
    """Write `params` (HF names, stacked layers) as a GGUF file; returns {gguf tensor name: GGML type}."""
    import gguf
    from tqdm import tqdm

    if ftype not in GGUF_TYPES:
        raise GGUFError(f"--type {ftype!r}: choose one of {', '.join(GGUF_TYPES)}")
    arch = ARCHITECTURES.get(cfg.model_type)
    if arch is None:
        raise GGUFError(f"model_type {cfg.model_type!r} has no GGUF architecture here")
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        raise GGUFError(f"sliding_window {cfg.sliding_window}: llama.cpp's {arch} architecture attends to everything")
    if cfg.o_bias:
        raise GGUFError("attention_bias on o_proj: llama.cpp's llama architecture has no output-projection bias")
    tok = tokenizer_metadata(Path(tokenizer_dir), cfg.vocab_size)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
            "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
        }[ftype]
    )
    rope_freqs = _rope_metadata(w, cfg, arch)

    w.add_tokenizer_model(tok["model"])
    if "pre" in tok:
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if "scores" in tok:
        w.add_token_scores(tok["scores"])
    if "merges" in tok:
        w.add_token_merges(tok["merges"])
    ids = {
        "bos_id": w.add_bos_token_id,
        "eos_id": w.add_eos_token_id,
        "unk_id": w.add_unk_token_id,
        "pad_id": w.add_pad_token_id,
    }
    for key, add in ids.items():
        if key in tok:
            add(tok[key])
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(tok["add_eos"])
    if "add_space_prefix" in tok:
        w.add_add_space_prefix(tok["add_space_prefix"])
    if "chat_template" in tok:
        w.add_chat_template(tok["chat_template"])

    types = {}

    def put(gname: str, arr: np.ndarray, layer: int | None):
        data, kind = encode_tensor(arr, tensor_type(gname, arr.ndim, ftype, layer, cfg.num_hidden_layers))
        raw = getattr(gguf.GGMLQuantizationType, kind)
        w.add_tensor(gname, data, raw_dtype=raw)  # quantized data is bytes; the writer derives the shape
        types[gname] = kind

    if rope_freqs is not None:
        put("rope_freqs.weight", rope_freqs, None)
    for hf_name, value in tqdm(params.items(), desc="gguf", disable=not progress):
        arr = np.asarray(value, dtype=np.float32)
        if hf_name.startswith(LAYER_PREFIX):
            rest = hf_name[len(LAYER_PREFIX) :]
            heads = rope_permuted(arch, rest, cfg)
            for i in range(cfg.num_hidden_layers):
                layer = arr[i] if heads is None else permute_rope(arr[i], heads)
                put(TENSOR_NAMES[rest].format(i), np.ascontiguousarray(layer), i)
        else:
            put(TENSOR_NAMES[hf_name], arr, None)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)  # a crash mid-write never leaves a truncated file under the final name
    return types


def export_gguf(model: str, out: str | os.PathLike, ftype: str = "f16", progress: bool = True) -> dict[str, str]:
    """A HF folder (or hub id) -> GGUF file; the Python API behind `smedjan export --format gguf`."""
    import jax.numpy as jnp

    from smedjan.checkpoint import load_hf, resolve_path

    folder = resolve_path(model)
    cfg, params = load_hf(folder, dtype=jnp.float32)
    return write_gguf(out, cfg, params, folder, ftype, name=Path(str(model).rstrip("/")).name, progress=progress)

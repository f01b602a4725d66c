"""A GGUF file (f32/f16/bf16/q8_0/q4_0/k-quants) back into a Hugging Face folder.

    smedjan convert gguf model.gguf --output model-hf/

Read with the `gguf` package's GGUFReader; quantized tensors are dequantized to float32, Q/K rows
of the `llama` architecture un-permuted to HF's rotate-half order, and the embedded tokenizer
rebuilt as tokenizer.json (byte-level BPE from `gpt2` vocabularies, SentencePiece-style BPE from
`llama` ones). The inverse of `smedjan.export.gguf`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from smedjan.config import ConfigError, ModelConfig
from smedjan.convert.llama2c import llama_tokenizer_json
from smedjan.export.gguf import ARCHITECTURES, TENSOR_NAMES, GGUFError, rope_permuted, unpermute_rope
from smedjan.model.transformer import LAYER_PREFIX

_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _reader(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated file: the reader raises several kinds
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _f32(value) -> float:
    """GGUF stores float32: 1e-5 comes back as 9.99999975e-06; take the shortest decimal that round-trips."""
    return float(str(np.float32(value)))


def read_config(meta: dict, tensors: dict, path: Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in _MODEL_TYPES:
        raise GGUFError(f"{path}: architecture {arch!r}; smedjan reads {sorted(_MODEL_TYPES)}")

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise GGUFError(f"{path}: metadata key {arch}.{name} missing")
        return value

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    rope_scaling = None
    if "rope_freqs.weight" in tensors:
        raise GGUFError(f"{path}: per-frequency RoPE factors (llama3 scaling) cannot be turned back into a config")
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    eos = meta.get("tokenizer.ggml.eos_token_id")
    try:
        return ModelConfig(
            model_type=_MODEL_TYPES[arch],
            vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # ggml order: [dim, vocab]
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_hidden_layers=int(key("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(key("attention.head_count_kv", heads)),
            head_dim=int(key("attention.key_length", hidden // heads)),
            max_position_embeddings=int(key("context_length")),
            rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon")),
            rope_theta=_f32(key("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias=arch == "llama" and "blk.0.attn_q.bias" in tensors,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=None if eos is None else int(eos),
        )
    except ConfigError as e:
        raise GGUFError(f"{path}: {e}") from None


def read_params(reader, cfg: ModelConfig, path: Path) -> dict[str, np.ndarray]:
    """HF-named float32 params in smedjan's stacked layout."""
    from gguf.quants import dequantize

    from smedjan.model.transformer import param_shapes

    tensors = {t.name: t for t in reader.tensors}
    arch = ARCHITECTURES[cfg.model_type]

    def load(gname: str, shape) -> np.ndarray:
        if gname not in tensors:
            raise GGUFError(f"{path}: tensor {gname!r} missing")
        t = tensors[gname]
        try:
            arr = dequantize(t.data, t.tensor_type).astype(np.float32)
        except NotImplementedError:
            raise GGUFError(f"{path}: tensor {gname!r} is {t.tensor_type.name}, which gguf cannot dequantize") from None
        if tuple(arr.shape) != tuple(shape):
            raise GGUFError(f"{path}: tensor {gname!r} has shape {tuple(arr.shape)}, the metadata implies {shape}")
        return arr

    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.startswith(LAYER_PREFIX):
            rest = name[len(LAYER_PREFIX) :]
            heads = rope_permuted(arch, rest, cfg)
            layers = [load(TENSOR_NAMES[rest].format(i), shape[1:]) for i in range(cfg.num_hidden_layers)]
            params[name] = np.stack([x if heads is None else unpermute_rope(x, heads) for x in layers])
        else:
            params[name] = load(TENSOR_NAMES[name], shape)
    return params


def tokenizer_files(meta: dict, path: Path) -> dict[str, dict]:
    """{file name: json} for the embedded tokenizer."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError(f"{path}: no embedded tokenizer (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    used = [(i, t) for i, (t, ty) in enumerate(zip(tokens, types)) if ty != 5]  # 5: UNUSED padding rows

    def special(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special("bos"),
        "eos_token": special("eos"),
        "unk_token": special("unknown"),
        "pad_token": special("padding"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    config = {k: v for k, v in config.items() if v is not None}

    if kind == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        tj = llama_tokenizer_json([(tokens[i], scores[i]) for i, _ in used])
        config["tokenizer_class"] = "LlamaTokenizerFast"
        return {"tokenizer.json": tj, "tokenizer_config.json": config}
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer model {kind!r}; smedjan reads 'gpt2' (byte-level BPE) and 'llama'")
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": types[i] == 3,
        }
        for i, t in used
        if types[i] in (3, 4)  # CONTROL, USER_DEFINED
    ]
    bos = special("bos")
    post = None
    if config["add_bos_token"] and bos is not None:
        bos_id = meta["tokenizer.ggml.bos_token_id"]
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": post,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in used},
            "merges": [m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges", [])],
        },
    }
    return {"tokenizer.json": tj, "tokenizer_config.json": config}


def gguf_to_hf(gguf_path: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write the HF folder (float32 weights, config, tokenizer) for a GGUF file; returns its path."""
    from smedjan.checkpoint import replace_dir, save_hf

    path = Path(gguf_path)
    reader = _reader(path)
    meta = _fields(reader)
    cfg = read_config(meta, {t.name: t for t in reader.tensors}, path)
    params = read_params(reader, cfg, path)
    files = tokenizer_files(meta, path)
    output = Path(output)
    tmp = save_hf(output.with_name(output.name + ".tmp-gguf"), cfg, params, dtype=np.float32)
    for name, content in files.items():
        (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False))
    return replace_dir(tmp, output, old_suffix=".old-save")

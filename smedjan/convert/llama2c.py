"""Convert a llama2.c checkpoint (+ its tokenizer .bin) into a Hugging Face Llama folder.

    smedjan convert llama2c --checkpoint stories260K.bin --tokenizer tok512.bin --output stories260K-hf/

The weights go through smedjan's own save_hf, so the folder loads in smedjan and in
transformers alike. llama2.c rotates Q/K as interleaved pairs while HF rotates
halves, so wq/wk rows are permuted exactly as llama2.c's own HF export does.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from smedjan.checkpoint import save_hf
from smedjan.config import ConfigError, ModelConfig
from smedjan.errors import UserError
from smedjan.model.transformer import LAYER_PREFIX

HEADER = struct.Struct("7i")


class Llama2cError(UserError):
    """A file that is not the llama2.c checkpoint or tokenizer it was given as."""


def _read(path: str | Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise Llama2cError(f"{path}: no such {what} file")
    raw = path.read_bytes()
    if len(raw) < HEADER.size:
        raise Llama2cError(f"{path}: {len(raw)} bytes is too short for a llama2.c {what}")
    return raw


def read_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    raw = _read(path, "checkpoint")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = HEADER.unpack_from(raw)
    shared = vocab > 0  # llama2.c's convention: a negative vocab size means an untied classifier
    vocab = abs(vocab)
    header = (dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len)
    if min(header) <= 0 or max(header) > 1 << 24 or dim % n_heads or n_heads % n_kv:
        raise Llama2cError(f"{path}: not a llama2.c version-0 checkpoint (header {header})")
    try:
        cfg = _config(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared)
    except ConfigError as e:
        raise Llama2cError(f"{path}: {e}") from None
    hd = dim // n_heads
    weights = np.frombuffer(raw, dtype=np.float32, offset=HEADER.size)
    offset = 0

    def take(*shape):
        nonlocal offset
        n = int(np.prod(shape))
        if offset + n > weights.size:
            raise Llama2cError(f"{path}: truncated llama2.c checkpoint (needs more than {weights.size} floats)")
        out = weights[offset : offset + n].reshape(shape)
        offset += n
        return out

    def unpermute(w, heads):  # interleaved-pair rows -> rotate-half rows, per head
        return w.reshape(w.shape[0], heads, hd // 2, 2, w.shape[-1]).swapaxes(2, 3).reshape(w.shape)

    L = LAYER_PREFIX
    p = {"model.embed_tokens.weight": take(vocab, dim), L + "input_layernorm.weight": take(n_layers, dim)}
    p[L + "self_attn.q_proj.weight"] = unpermute(take(n_layers, n_heads * hd, dim), n_heads)
    p[L + "self_attn.k_proj.weight"] = unpermute(take(n_layers, n_kv * hd, dim), n_kv)
    p[L + "self_attn.v_proj.weight"] = take(n_layers, n_kv * hd, dim)
    p[L + "self_attn.o_proj.weight"] = take(n_layers, dim, n_heads * hd)
    p[L + "post_attention_layernorm.weight"] = take(n_layers, dim)
    p[L + "mlp.gate_proj.weight"] = take(n_layers, hidden, dim)
    p[L + "mlp.down_proj.weight"] = take(n_layers, dim, hidden)
    p[L + "mlp.up_proj.weight"] = take(n_layers, hidden, dim)
    p["model.norm.weight"] = take(dim)
    take(seq_len, hd // 2)  # freq_cis_real: RoPE tables, recomputed by every runtime
    take(seq_len, hd // 2)  # freq_cis_imag
    if not shared:
        p["lm_head.weight"] = take(vocab, dim)
    return cfg, p


def _config(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared) -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=shared,
        bos_token_id=1,
        eos_token_id=2,
    )


def read_tokenizer(path: str | Path, vocab_size: int) -> list[tuple[str, float]]:
    """(piece, score) in id order, with SentencePiece's '▁' restored (llama2.c stores a space)."""
    raw = _read(path, "tokenizer")
    offset = 4  # max_token_length
    pieces = []
    for i in range(vocab_size):
        try:
            score, n = struct.unpack_from("fi", raw, offset)
            offset += 8
            text = raw[offset : offset + n].decode("utf-8")
        except (struct.error, UnicodeDecodeError):
            raise Llama2cError(
                f"{path}: not a llama2.c tokenizer for {vocab_size} tokens (token {i} unreadable)"
            ) from None
        offset += n
        text = {"\n<s>\n": "<s>", "\n</s>\n": "</s>"}.get(text, text).replace(" ", "▁")
        pieces.append((text, score))
    return pieces


def llama_tokenizer_json(pieces: list[tuple[str, float]]) -> dict:
    """A Llama-style (SentencePiece BPE with byte fallback) tokenizer.json.

    BPE merges are recovered from the scored vocabulary the way transformers'
    SentencePiece converter does: every split of a piece into two known pieces,
    ranked by the merged piece's score.
    """
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    merges = []
    for piece, score in pieces:
        local = [
            (piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab
        ]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: m[2], reverse=True)
    special = [
        {
            "id": i,
            "content": p,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, (p, _) in enumerate(pieces[:3])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[a, b] for a, b, _ in merges],
        },
    }


def convert(checkpoint: str | Path, tokenizer: str | Path, output: str | Path) -> Path:
    cfg, params = read_checkpoint(checkpoint)
    output = Path(output)
    save_hf(output, cfg, params, dtype=np.float32)
    (output / "tokenizer.json").write_text(json.dumps(llama_tokenizer_json(read_tokenizer(tokenizer, cfg.vocab_size))))
    (output / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "model_max_length": cfg.max_position_embeddings,
            },
            indent=2,
        )
    )
    return output

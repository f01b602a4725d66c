"""Tiny test subjects for the export formats: a smedjan byte-level BPE model and the converted stories260K."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from conftest import SHARED_DATA

from smedjan.checkpoint import save_hf
from smedjan.config import ModelConfig
from smedjan.model.transformer import init_params
from smedjan.tokenizer import train_tokenizer

STORIES = SHARED_DATA / "models" / "stories260K"
TEXT = (
    "The smith hammered the hot iron on the anvil, and sparks flew across the forge.\n"
    "Once upon a time a little robot learned to build boats from driftwood.\n"
    "Hello, how are you today? I am fine, thank you very much!\n"
    "Language models predict the next token from the tokens before it.\n"
) * 30


def bpe_model(folder: Path, *, hidden: int = 256, scale: float = 8.0, **overrides) -> Path:
    """smedjan's own tokenizer (byte-level BPE, ChatML template) and a random GQA Llama with an untied head.

    Weights are scaled up from the usual 0.02 so that logits are peaked: greedy choices then have
    margins far above fp16 rounding, and two runtimes agreeing token for token means something.
    """
    text = folder.parent / (folder.name + "-corpus.txt")
    text.write_text(TEXT)
    tok_dir = train_tokenizer([str(text)], folder.parent / (folder.name + "-tok"), 300, progress=False)
    kw = dict(
        vocab_size=320,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    cfg = ModelConfig(**{**kw, **overrides})
    params = init_params(cfg, jax.random.key(0))
    params = {k: v if k.endswith("norm.weight") else v * scale for k, v in params.items()}
    return save_hf(folder, cfg, params, tokenizer_dir=tok_dir, dtype=np.float32)


def stories_model(folder: Path) -> Path:
    from smedjan.convert.llama2c import convert

    return convert(STORIES / "stories260K.bin", STORIES / "tok512.bin", folder)

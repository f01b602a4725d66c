"""Prompts are encoded as AutoTokenizer encodes them for that folder: BOS only where its tokenizer adds one."""

from __future__ import annotations

import json
import string

import pytest
import torch
import transformers
from hf_utils import build_hf_model
from tokenizers import Tokenizer, models, processors

from smedjan.cli import main
from smedjan.tokenizer import Tokenizer as SmedjanTokenizer


def _char_tokenizer(folder, bos: str, bos_rule: bool):
    """A character-level tokenizer (fits the tiny model's 211 ids); with `bos_rule`, a post-processor
    that prepends `bos` (Llama style), else none (GPT-2 style: bos <|endoftext|> is never added)."""
    specials = ["<|endoftext|>", "<s>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.ascii_letters + string.digits + " .,!?'"))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.add_special_tokens(specials)
    if bos_rule:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
        )
    tk.save(str(folder / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_generate_encodes_like_autotokenizer(tmp_path, capsys, style):
    bos, rule = ("<|endoftext|>", False) if style == "gpt2" else ("<s>", True)
    model = build_hf_model("llama", seed=21, bos_token_id=0 if style == "gpt2" else 1, eos_token_id=0)
    model.save_pretrained(tmp_path)
    _char_tokenizer(tmp_path, bos, rule)
    prompt = "Once upon a time"
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = auto(prompt)["input_ids"]
    assert (ids[0] == auto.convert_tokens_to_ids(bos)) == rule  # the two folders really differ
    assert SmedjanTokenizer.from_dir(tmp_path).encode_prompt(prompt) == ids

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(ids) :]
    want = auto.decode(out, skip_special_tokens=True)
    capsys.readouterr()
    assert main(["generate", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == want + "\n"

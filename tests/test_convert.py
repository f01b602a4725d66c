"""llama2.c -> HF conversion on a real pretrained model (stories260K from ../shared/data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import SHARED_DATA

from smedjan.checkpoint import load_hf
from smedjan.convert.llama2c import convert
from smedjan.infer import generate
from smedjan.model import logits_fn

STORIES = SHARED_DATA / "models" / "stories260K"
pytestmark = pytest.mark.skipif(
    not (STORIES / "stories260K.bin").is_file(), reason=f"{STORIES} not present (shared data)"
)

# llama2.c's README documents this greedy continuation from BOS for stories260K.
EXPECTED = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert(STORIES / "stories260K.bin", STORIES / "tok512.bin", tmp_path_factory.mktemp("s260") / "hf")


def test_greedy_story_matches_llama2c(converted):
    cfg, params = load_hf(converted)
    new = generate(params, cfg, [[cfg.bos_token_id]], max_new_tokens=40, temperature=0.0)[0]
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    assert tok.decode(new, skip_special_tokens=True).startswith(EXPECTED)
    assert tok(EXPECTED).input_ids[:6] == [cfg.bos_token_id] + new[:5]


def test_converted_model_loads_in_transformers(converted):
    cfg, params = load_hf(converted)
    model = transformers.AutoModelForCausalLM.from_pretrained(converted).float().eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 64))
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens)).logits.numpy()
    out = np.asarray(logits_fn(params, tokens, cfg))
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4

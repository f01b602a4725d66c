"""ONNX export run by onnxruntime: logits equal to smedjan's (fp32), KV cache and padding, greedy text equal."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import transformers
from export_models import STORIES, bpe_model, stories_model

from smedjan.checkpoint import load_hf
from smedjan.cli import main
from smedjan.infer import generate
from smedjan.model import logits_fn


class Session:
    """The decoder the way optimum/transformers.js drive it: feed past_key_values, read present.*."""

    def __init__(self, folder):
        self.sess = ort.InferenceSession(str(folder / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
        self.cfg = json.loads((folder / "config.json").read_text())
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def empty(self, batch):
        c = self.cfg
        shape = (batch, c["num_key_value_heads"], 0, c["head_dim"])
        return {
            f"past_key_values.{i}.{k}": np.zeros(shape, np.float32)
            for i in range(c["num_hidden_layers"])
            for k in ("key", "value")
        }

    def __call__(self, ids, past, mask, pos):
        out = dict(
            zip(
                self.outputs,
                self.sess.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}),
            )
        )
        present = {k.replace("present", "past_key_values"): v for k, v in out.items() if k.startswith("present")}
        return out["logits"], present

    def greedy(self, prompt, n, eos):
        ids = np.asarray([prompt], np.int64)
        past, new = self.empty(1), []
        for _ in range(n):
            total = past["past_key_values.0.key"].shape[2] + ids.shape[1]
            pos = np.arange(total - ids.shape[1], total)[None]
            logits, past = self(ids, past, np.ones((1, total), np.int64), pos)
            tok = int(logits[0, -1].argmax())
            if tok == eos:
                break
            new.append(tok)
            ids = np.asarray([[tok]], np.int64)
        return new


@pytest.fixture(scope="module", params=["bpe", "stories"])
def subject(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "stories":
        if not (STORIES / "stories260K.bin").is_file():
            pytest.skip(f"{STORIES} not present (shared data)")
        hf = stories_model(root / "hf")
    else:  # tied head, qkv bias: the graph's other branches
        hf = bpe_model(root / "hf", hidden=64, scale=4.0, tie_word_embeddings=True, attention_bias=True)
    assert main(["export", str(hf), "--format", "onnx", "--out", str(root / "onnx")]) == 0
    return hf, root / "onnx"


def test_logits_equal_jax_fp32(subject):
    hf, out = subject
    cfg, params = load_hf(hf, dtype=np.float32)
    sess = Session(out)
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
    ref = np.asarray(logits_fn(params, toks, cfg))
    pos = np.broadcast_to(np.arange(16), (2, 16))
    logits, present = sess(toks, sess.empty(2), np.ones((2, 16), np.int64), pos)
    np.testing.assert_allclose(logits, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)
    assert present["past_key_values.0.key"].shape == (2, cfg.num_key_value_heads, 16, cfg.head_dim)
    # the same positions through the cache: 10 tokens, then 6 more
    _, past = sess(toks[:, :10], sess.empty(2), np.ones((2, 10), np.int64), pos[:, :10])
    logits2, _ = sess(toks[:, 10:], past, np.ones((2, 16), np.int64), pos[:, 10:])
    np.testing.assert_allclose(logits2, ref[:, 10:], atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_left_padding_is_masked(subject):
    hf, out = subject
    cfg, params = load_hf(hf, dtype=np.float32)
    sess = Session(out)
    toks = np.random.default_rng(1).integers(3, cfg.vocab_size, (1, 7))
    ref = np.asarray(logits_fn(params, toks, cfg))[0, -1]
    padded = np.concatenate([np.zeros((1, 3), np.int64), toks], axis=1)
    mask = np.asarray([[0, 0, 0] + [1] * 7])
    pos = np.asarray([[0, 0, 0, *range(7)]])
    logits, _ = sess(padded, sess.empty(1), mask, pos)
    np.testing.assert_allclose(logits[0, -1], ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_greedy_text_equal(subject):
    hf, out = subject
    cfg, params = load_hf(hf, dtype=np.float32)
    tok = transformers.AutoTokenizer.from_pretrained(out)  # the exported folder's tokenizer files load
    prompt = tok("Once upon a time").input_ids
    want = generate(params, cfg, [prompt], max_new_tokens=30, temperature=0.0, eos_id=cfg.eos_token_id)[0]
    got = Session(out).greedy(prompt, 30, cfg.eos_token_id)
    assert got == want and tok.decode(got) == tok.decode(want)

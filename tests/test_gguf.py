"""GGUF export read back by the `gguf` package's own reader, and run by llama.cpp where it is installed."""

from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
import transformers
from export_models import STORIES, bpe_model, stories_model
from gguf import GGUFReader

from smedjan.checkpoint import load_hf
from smedjan.cli import main
from smedjan.convert.gguf import gguf_to_hf
from smedjan.export.gguf import export_gguf, unpermute_rope
from smedjan.export.kquants import quantize_q4_k, quantize_q6_k
from smedjan.infer import generate
from smedjan.model import logits_fn
from smedjan.model.transformer import LAYER_PREFIX

needs_stories = pytest.mark.skipif(not (STORIES / "stories260K.bin").is_file(), reason=f"{STORIES} not present")
# Largest |dequantized - source| as a fraction of the tensor's largest |value|: half a quantization step
# of each format, a whole one for q4_0 (ggml rounds it by truncation and clips the largest value to 15;
# q4_k_m mixes Q4_K/Q6_K, with Q5_0/Q8_0 where rows do not fit 256-blocks).
TOLERANCE = {"f32": 0.0, "f16": 1e-3, "bf16": 4e-3, "q8_0": 1 / 200, "q4_0": 1 / 8, "q4_k_m": 1 / 12}
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "lm_head.weight": "output.weight",
    "model.norm.weight": "output_norm.weight",
    "self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "mlp.down_proj.weight": "blk.{}.ffn_down.weight",
}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return bpe_model(tmp_path_factory.mktemp("bpe") / "hf")


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    if not (STORIES / "stories260K.bin").is_file():
        pytest.skip(f"{STORIES} not present (shared data)")
    return stories_model(tmp_path_factory.mktemp("s260") / "hf")


@pytest.fixture(scope="module")
def bpe_files(bpe, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe-gguf")
    return {t: (out / f"{t}.gguf", export_gguf(bpe, out / f"{t}.gguf", t, progress=False)) for t in TOLERANCE}


def _tensor(reader, name):
    t = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type), t.tensor_type.name


@pytest.mark.parametrize("ftype", list(TOLERANCE))
def test_tensors_read_back_within_format_error(bpe, bpe_files, ftype):
    _, params = load_hf(bpe, dtype=np.float32)
    path, types = bpe_files[ftype]
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert len(reader.tensors) == 2 * 9 + 3  # every tensor: 9 per layer, embedding, head, final norm
    for hf, gname in GGUF_NAMES.items():
        src = np.asarray(params[hf] if LAYER_PREFIX + hf not in params else params[LAYER_PREFIX + hf][1])
        got, kind = _tensor(reader, gname.format(1))
        if "q_proj" in hf:
            got = unpermute_rope(got, 4)
        elif "k_proj" in hf:
            got = unpermute_rope(got, 2)
        assert got.shape == src.shape, gname
        assert np.abs(got - src).max() <= TOLERANCE[ftype] * np.abs(src).max() + 1e-7, (gname, kind)
        assert kind == types[gname.format(1)]
    if ftype == "q4_k_m":  # the mix: Q6_K for the head, Q4_K for most of the rest (rows of 256 and 512)
        assert types["output.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q4_K"
    assert set(types.values()) >= {"F32"}  # norms stay float32 in every type


def test_tokenizer_and_metadata_embedded(bpe, bpe_files):
    reader = GGUFReader(bpe_files["f16"][0])
    f = {k: v.contents() for k, v in reader.fields.items()}
    tj = json.loads((bpe / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == 320 and f["llama.vocab_size"] == 320
    assert all(f["tokenizer.ggml.tokens"][i] == t for t, i in vocab.items())
    assert f["tokenizer.ggml.merges"][:3] == [
        " ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"][:3]
    ]
    assert f["tokenizer.ggml.token_type"][1] == gguf.TokenType.CONTROL and f["tokenizer.ggml.token_type"][300] == 5
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.chat_template"] == (bpe / "chat_template.jinja").read_text()
    assert f["llama.attention.head_count_kv"] == 2 and f["llama.embedding_length"] == 256


@needs_stories
def test_qk_rows_are_llama_cpp_order(stories, tmp_path):
    """llama2.c stores wq in the interleaved order llama.cpp uses: the exported rows must equal its bytes."""
    path = tmp_path / "s.gguf"
    export_gguf(stories, path, "f32", progress=False)
    raw = np.frombuffer((STORIES / "stories260K.bin").read_bytes(), np.float32, offset=struct.calcsize("7i"))
    dim, vocab = 64, 512
    wq0 = raw[vocab * dim + 5 * dim :][: dim * dim].reshape(dim, dim)  # after embedding and 5 attn norms
    got, kind = _tensor(GGUFReader(path), "blk.0.attn_q.weight")
    assert kind == "F32" and np.array_equal(got, wq0)


@needs_stories
def test_sentencepiece_tokenizer_round_trip(stories, tmp_path):
    path = tmp_path / "s.gguf"
    export_gguf(stories, path, "q8_0", progress=False)
    f = {k: v.contents() for k, v in GGUFReader(path).fields.items()}
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]
    assert f["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]  # unknown, control, control, byte
    back = gguf_to_hf(path, tmp_path / "back")
    a, b = transformers.AutoTokenizer.from_pretrained(stories), transformers.AutoTokenizer.from_pretrained(back)
    text = "Once upon a time, Lily saw a big dog. Zebra quokka!"
    assert a(text).input_ids == b(text).input_ids


@pytest.mark.parametrize("ftype", ["f32", "q8_0", "q4_0"])
def test_gguf_to_hf_round_trip(bpe, bpe_files, tmp_path, ftype):
    back = gguf_to_hf(bpe_files[ftype][0], tmp_path / "back")
    cfg0, p0 = load_hf(bpe, dtype=np.float32)
    cfg1, p1 = load_hf(back, dtype=np.float32)
    assert cfg1 == cfg0
    if ftype == "f32":
        tokens = np.random.default_rng(0).integers(0, cfg0.vocab_size, (1, 24))
        np.testing.assert_array_equal(logits_fn(p0, tokens, cfg0), logits_fn(p1, tokens, cfg1))
    for name, value in p0.items():  # every tensor back in HF's layout (q/k rows un-permuted)
        src = np.asarray(value)
        assert np.abs(np.asarray(p1[name]) - src).max() <= TOLERANCE[ftype] * np.abs(src).max() + 1e-7, name
    t0, t1 = transformers.AutoTokenizer.from_pretrained(bpe), transformers.AutoTokenizer.from_pretrained(back)
    text = "The smith says: hello, robot!"
    assert t0(text).input_ids == t1(text).input_ids and t1.chat_template == t0.chat_template


def test_k_quant_blocks_match_gguf_layout():
    x = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32) * np.linspace(0.1, 3, 512)
    for quantize, kind, step in ((quantize_q4_k, "Q4_K", 15), (quantize_q6_k, "Q6_K", 63)):
        got = gguf.quants.dequantize(quantize(x), getattr(gguf.GGMLQuantizationType, kind))
        for block in range(2):  # error within one step of each 256-block's range (scales are 6-bit too)
            sl = np.s_[:, block * 256 : (block + 1) * 256]
            assert np.abs(got[sl] - x[sl]).max() < np.ptp(x[sl]) / step, kind


def test_cli_errors_are_one_line(bpe, tmp_path, capsys):
    (tmp_path / "notok").mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "notok" / f).write_bytes((bpe / f).read_bytes())
    assert main(["export", str(tmp_path / "notok"), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 1
    assert "no tokenizer.json" in capsys.readouterr().err
    assert main(["convert", "gguf", str(bpe / "config.json"), "--output", str(tmp_path / "o")]) == 1
    assert "not a readable GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---- llama.cpp itself (llama-cpp-python builds it from source; CI runs this where it is installed) ----
def _llama(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, seed=0)


def _llama_greedy(llm, prompt_ids, n):
    out = []
    for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if tok == llm.token_eos() or len(out) == n:
            break
        out.append(tok)
    return out


def _smedjan_greedy(folder, prompt_ids, n):
    cfg, params = load_hf(folder, dtype=np.float32)
    return generate(params, cfg, [prompt_ids], max_new_tokens=n, temperature=0.0)[0]


@pytest.mark.llamacpp
@pytest.mark.parametrize("subject", ["bpe", "stories"])
def test_llama_cpp_f16_greedy_equals_smedjan(subject, request, tmp_path):
    folder = request.getfixturevalue(subject)
    path = tmp_path / "m.gguf"
    export_gguf(folder, path, "f16", progress=False)
    llm = _llama(path)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = "Once upon a time" if subject == "stories" else "The smith"
    ids = tok(prompt).input_ids
    assert llm.tokenize(prompt.encode(), add_bos=True) == ids  # the embedded tokenizer, in llama.cpp
    # smedjan runs the file's own (f16-rounded) weights, read back through gguf_to_hf
    want = _smedjan_greedy(gguf_to_hf(path, tmp_path / "back"), ids, 40)
    assert _llama_greedy(llm, ids, 40) == want and len(want) >= 10
    if subject == "stories":
        assert tok.decode(want).startswith(", there was a little girl named Lily")


@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype", ["q8_0", "q4_0", "q4_k_m"])
def test_llama_cpp_runs_quantized(stories, tmp_path, ftype):
    path = tmp_path / f"{ftype}.gguf"
    export_gguf(stories, path, ftype, progress=False)
    text = _llama(path).create_completion("Once upon a time", max_tokens=30, temperature=0.0)["choices"][0]["text"]
    assert len(text.split()) >= 5, text

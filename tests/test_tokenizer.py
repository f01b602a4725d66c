"""`smedjan tokenizer`: HF-compatible byte-level BPE folders and the `Tokenizer` wrapper."""

import gzip
import json

import pytest
from conftest import SHARED_DATA

from smedjan.cli import main
from smedjan.text import bundled_corpus
from smedjan.tokenizer import BOS, EOS, IM_END, Tokenizer, train_tokenizer

SAMPLES = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "  leading spaces, trailing spaces   ",
    "Ünïcödé — “quotes”, emoji 🎉, CJK 漢字, tabs\tand\r\nnewlines\n\n",
    "numbers 1234567890 and symbols <>{}[]()!?@#$%^&*",
    "special tokens in text: <|bos|> hello <|eos|><|im_start|>user",
    "",
]


@pytest.fixture(scope="module")
def bundled_tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([str(bundled_corpus())], out, vocab_size=1024, progress=False)
    return out


def _corpus_lines(n=200):
    with gzip.open(bundled_corpus(), "rt") as f:
        return [line.rstrip("\n") for _, line in zip(range(n), f)]


def _check_against_transformers(folder, texts):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder))
    ours = Tokenizer.from_dir(folder)
    assert ours.vocab_size == len(hf)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    for text in texts:
        ids = ours.encode(text, add_bos=True)
        assert hf(text)["input_ids"] == ids, text
        assert ids[0] == ours.bos_id
        assert ours.encode(text) == ids[1:]
        assert hf.encode(text, add_special_tokens=False) == ids[1:]
        # byte-level BPE is lossless
        if "<|" not in text:
            assert ours.decode(ids[1:]) == text
            assert hf.decode(ids, skip_special_tokens=True) == text
    batch = ours.encode_batch(texts)
    assert batch == [ours.encode(t) for t in texts]


def test_bundled_corpus_tokenizer_matches_transformers(bundled_tok):
    files = {p.name for p in bundled_tok.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= files
    tok = Tokenizer.from_dir(bundled_tok)
    assert tok.vocab_size == 1024
    assert tok.bos_id == 1 and tok.eos_id == 2
    assert tok.token_to_id(BOS) == 1 and tok.token_to_id(EOS) == 2
    assert tok.token_to_id(IM_END) in tok.stop_ids and tok.eos_id in tok.stop_ids
    _check_against_transformers(bundled_tok, SAMPLES + _corpus_lines())
    # BPE learned merges: real text compresses well below one token per byte
    text = "\n".join(_corpus_lines(500))
    assert len(tok.encode(text)) < 0.5 * len(text.encode())


def test_chat_template_renders_like_transformers(bundled_tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(bundled_tok))
    ours = Tokenizer.from_dir(bundled_tok)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who is Romeo?"},
        {"role": "assistant", "content": "A Montague."},
        {"role": "user", "content": "And Juliet?"},
    ]
    for gen in (True, False):
        ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        got = ours.apply_chat_template(messages, add_generation_prompt=gen)
        assert got == ref
        ref_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
        assert ours.encode(got) == list(ref_ids)
    rendered = ours.apply_chat_template(messages[:2])
    assert rendered.startswith(BOS + "<|im_start|>system\nBe brief.<|im_end|>\n")
    assert rendered.endswith("<|im_start|>assistant\n")


@pytest.mark.skipif(
    not (SHARED_DATA / "pretrain" / "headlines_combined.txt").is_file(),
    reason="shared data (../shared/data/pretrain) not available",
)
def test_shared_headlines_tokenizer_matches_transformers(tmp_path):
    src = SHARED_DATA / "pretrain" / "headlines_combined.txt"
    rc = main(["tokenizer", "--input", str(src), "--vocab-size", "2048", "--output", str(tmp_path / "tok")])
    assert rc == 0
    with open(src, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for _, line in zip(range(300), f)]
    texts = lines
    wiki = SHARED_DATA / "eval" / "wikitext-2-test.txt"
    if wiki.is_file():
        texts = texts + wiki.read_text(encoding="utf-8").splitlines()[:100]
    _check_against_transformers(tmp_path / "tok", texts)


def test_jsonl_gz_inputs_with_text_field_and_globs(tmp_path):
    docs = [
        {"body": f"Document number {i}: " + "the quick brown fox jumps over the lazy dog. " * 3, "id": i}
        for i in range(50)
    ]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        for d in docs[:25]:
            f.write(json.dumps(d) + "\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        for d in docs[25:]:
            f.write(json.dumps(d) + "\n")
    out = tmp_path / "tok"
    rc = main(
        [
            "tokenizer",
            "--input",
            str(tmp_path / "*.jsonl*"),
            "--text-field",
            "body",
            "--vocab-size",
            "300",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    tok = Tokenizer.from_dir(out)
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode(docs[3]["body"])) == docs[3]["body"]
    # "the" was frequent enough to become one token
    assert len(tok.encode(" the")) == 1


def test_bad_inputs_give_clean_errors(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    assert main(["tokenizer", "--input", str(empty), "--output", str(tmp_path / "t1")]) == 1
    err = capsys.readouterr().err
    assert "error" in err and "no text" in err and "Traceback" not in err

    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 10)
    assert main(["tokenizer", "--input", str(text), "--vocab-size", "200", "--output", str(tmp_path / "t2")]) == 1
    err = capsys.readouterr().err
    assert "below the byte alphabet" in err and "262" in err

    assert main(["tokenizer", "--input", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "t3")]) == 1
    assert "no such file" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    assert main(["tokenizer", "--input", str(bad), "--output", str(tmp_path / "t4")]) == 1
    assert "--text-field" in capsys.readouterr().err

    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.skipif(
    not (SHARED_DATA / "models" / "gpt2_bpe_tokenizer" / "vocab.bpe").is_file(),
    reason="shared data (../shared/data/models) not available",
)
def test_wrapper_loads_a_foreign_hf_tokenizer_folder(tmp_path):
    """Any folder with a tokenizer.json works (here GPT-2's BPE, with its tokens in tokenizer_config)."""
    from tokenizers import ByteLevelBPETokenizer

    src = SHARED_DATA / "models" / "gpt2_bpe_tokenizer"
    bpe = ByteLevelBPETokenizer(str(src / "encoder.json"), str(src / "vocab.bpe"))
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<|endoftext|>", "special": True}, "eos_token": "<|endoftext|>"})
    )
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert tok.bos_id == tok.eos_id == 50256 and tok.vocab_size == 50257
    assert tok.encode("Hello world", add_bos=True, add_eos=True) == [50256, 15496, 995, 50256]
    assert tok.decode([15496, 995]) == "Hello world"
    assert (
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
        == "<|endoftext|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )

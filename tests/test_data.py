"""`smedjan prepare`: flat token files, header, validation split, streaming, tokenizer hash checks."""

import gzip
import json
import math

import numpy as np
import pytest
from conftest import SHARED_DATA

from smedjan.cli import main
from smedjan.data import DataError, TokenDataset, is_val_doc, iter_documents, prepare, token_dtype
from smedjan.text import bundled_corpus
from smedjan.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([str(bundled_corpus())], out, vocab_size=512, progress=False)
    return out


@pytest.fixture(scope="module")
def other_tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok2")
    train_tokenizer([str(bundled_corpus())], out, vocab_size=400, progress=False)
    return out


def _paragraphs(n):
    return [
        f"Speaker {i}:\nline one of speech {i}, with words.\nline two {'and more ' * (i % 5)}end." for i in range(n)
    ]


def test_prepare_counts_header_and_val_split(tmp_path, tok_dir):
    docs = _paragraphs(40)
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(docs) + "\n")
    out = tmp_path / "data"
    assert (
        main(
            [
                "prepare",
                "--input",
                str(src),
                "--tokenizer",
                str(tok_dir),
                "--output",
                str(out),
                "--val-fraction",
                "0.1",
                "--batch-docs",
                "7",
            ]
        )
        == 0
    )
    header = json.loads((out / "header.json").read_text())
    tok = Tokenizer.from_dir(tok_dir)
    assert header["tokenizer_sha256"] == tok.hash
    assert header["vocab_size"] == 512 and header["dtype"] == "uint16"
    assert header["documents"] == 40
    val_idx = [i for i in range(40) if is_val_doc(i, 0.1)]
    assert len(val_idx) == 4 == header["splits"]["val"]["documents"]
    assert header["splits"]["train"]["documents"] == 36

    expected = {"train": [], "val": []}
    for i, d in enumerate(docs):
        expected["val" if i in val_idx else "train"].extend([tok.bos_id, *tok.encode(d), tok.eos_id])
    ds = TokenDataset(out)
    for split in ("train", "val"):
        arr = ds.tokens(split, stream=True)
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint16
        assert arr.tolist() == expected[split]
        assert header["splits"][split]["tokens"] == len(expected[split])
        assert ds.tokens(split, stream=False).tolist() == expected[split]
    assert header["tokens"] == len(expected["train"]) + len(expected["val"])
    train = ds.tokens("train", stream=False)
    assert train[0] == tok.bos_id and train[-1] == tok.eos_id
    assert int((train == tok.bos_id).sum()) == 36 == int((train == tok.eos_id).sum())
    # documents decode back to the text
    first = train[1 : np.argmax(train == tok.eos_id)]
    assert tok.decode(first) == docs[0]


def test_streaming_batches_give_identical_files(tmp_path, tok_dir):
    lines = [f"headline number {i} about {'markets' if i % 3 else 'weather'} today" for i in range(300)]
    src = tmp_path / "h.txt.gz"
    with gzip.open(src, "wt") as f:
        f.write("\n".join(lines) + "\n")
    a = prepare([str(src)], tok_dir, tmp_path / "a", val_fraction=0.05, batch_docs=1, progress=False)
    prepare([str(src)], tok_dir, tmp_path / "b", val_fraction=0.05, batch_docs=1000, progress=False)
    assert a["documents"] == 300  # --split auto: no blank lines -> one document per line
    assert a["splits"]["val"]["documents"] == 15
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == (tmp_path / "b" / f"{split}.bin").read_bytes()


def test_jsonl_and_split_modes(tmp_path, tok_dir):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}\n\nwith a blank line"}) + "\n" for i in range(10)))
    h = prepare([str(src)], tok_dir, tmp_path / "j", val_fraction=0.2, progress=False)
    assert h["documents"] == 10 and h["splits"]["val"]["documents"] == 2
    txt = tmp_path / "t.txt"
    txt.write_text("a b\nc d\n\ne f\n")
    assert list(iter_documents([txt], split="blank")) == ["a b\nc d", "e f"]
    assert list(iter_documents([txt], split="line")) == ["a b", "c d", "e f"]
    assert list(iter_documents([txt], split="auto")) == ["a b\nc d", "e f"]
    assert list(iter_documents([txt], split="file")) == ["a b\nc d\n\ne f\n"]


def test_dtype_choice():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(151_936) == np.uint32
    assert sum(is_val_doc(i, 0.01) for i in range(1000)) == 10


def test_errors_empty_too_few_docs_and_hash_mismatch(tmp_path, tok_dir, other_tok_dir, capsys):
    empty = tmp_path / "e.txt"
    empty.write_text("")
    assert main(["prepare", "--input", str(empty), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "x")]) == 1
    assert "no text" in capsys.readouterr().err
    assert not (tmp_path / "x" / "header.json").exists()

    two = tmp_path / "two.txt"
    two.write_text("one\ntwo\n")
    assert (
        main(
            [
                "prepare",
                "--input",
                str(two),
                "--tokenizer",
                str(tok_dir),
                "--output",
                str(tmp_path / "y"),
                "--val-fraction",
                "0.1",
            ]
        )
        == 1
    )
    assert "needs at least 10" in capsys.readouterr().err

    src = tmp_path / "c.txt"
    src.write_text("\n".join(f"line {i} of text" for i in range(100)))
    prepare([str(src)], tok_dir, tmp_path / "d", progress=False)
    with pytest.raises(DataError, match="different tokenizer"):
        TokenDataset(tmp_path / "d").check_tokenizer(other_tok_dir)
    TokenDataset(tmp_path / "d").check_tokenizer(tok_dir)  # the right one passes
    # ... and the trainer refuses the mix with a one-line error
    rc = main(
        [
            "train",
            "--dataset",
            str(tmp_path / "d"),
            "--tokenizer",
            str(other_tok_dir),
            "--size",
            "tiny",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "different tokenizer" in err and "Traceback" not in err

    (tmp_path / "d" / "train.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError, match="truncated"):
        TokenDataset(tmp_path / "d")


@pytest.mark.skipif(
    not (SHARED_DATA / "pretrain" / "headlines.txt").is_file(),
    reason="shared data (../shared/data/pretrain) not available",
)
def test_prepare_real_headlines(tmp_path, tok_dir):
    src = SHARED_DATA / "pretrain" / "headlines.txt"
    n_lines = sum(1 for line in open(src, encoding="utf-8") if line.strip())
    h = prepare([str(src)], tok_dir, tmp_path / "h", val_fraction=0.02, progress=False)
    assert h["documents"] == n_lines
    assert h["splits"]["val"]["documents"] == math.floor(n_lines * 0.02 + 1e-9)
    ds = TokenDataset(tmp_path / "h")
    train = ds.tokens("train")
    assert int((train == 1).sum()) == h["splits"]["train"]["documents"]

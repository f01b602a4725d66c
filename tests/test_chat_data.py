"""Post-training data: row shapes, chat-template masks, bad rows, packing, preference pairs."""

import gzip
import json

import numpy as np
import pytest

from smedjan.data.chat import ChatEncoder, pack, sft_examples, sft_items
from smedjan.data.preference import pair_arrays, preference_pairs, preference_triple
from smedjan.text import DataError
from smedjan.tokenizer import IM_END, Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "c.txt").write_text("hello world, the answer is four. what is two plus two?\n" * 50)
    return Tokenizer.from_dir(train_tokenizer([str(d / "c.txt")], d / "tok", 300, progress=False))


def _write(path, rows):
    with gzip.open(path, "wt") if str(path).endswith(".gz") else open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_row_shapes():
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert sft_items(chat) == [chat["messages"]]
    assert sft_items({"instruction": "do", "input": "x", "output": "y"})[0][0]["content"] == "do\n\nx"
    assert sft_items({"instruction": "do", "output": "y"})[0][0]["content"] == "do"
    two = sft_items({"instruction": "do", "instances": [{"input": "", "output": "a"}, {"input": "b", "output": "c"}]})
    assert [m[1]["content"] for m in two] == ["a", "c"]
    assert sft_items({"text": "plain"}) == ["plain"]


def test_assistant_tokens_only_are_targets(tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is two plus two?"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"},
    ]
    ex = ChatEncoder(tok).encode_messages(msgs)
    # the pieces tokenise to exactly the whole rendering's ids
    assert ex.ids == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False))
    target_text = tok.decode([i for i, m in zip(ex.ids, ex.mask) if m])
    assert target_text == f"four{IM_END}\nworld{IM_END}\n"
    assert "what" not in target_text and "brief" not in target_text


def test_files_gz_json_array_and_bad_rows(tmp_path, tok):
    good = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}
    p = _write(tmp_path / "d.jsonl.gz", [good, {"instruction": "hi", "output": "there"}, "{broken", {"messages": "x"}])
    with pytest.raises(DataError, match=r"d\.jsonl\.gz:3: not valid JSON"):
        sft_examples(p, tok, max_len=64)
    exs, stats = sft_examples(p, tok, max_len=64, skip_bad_rows=True)
    assert len(exs) == 2 and stats.bad.count == 2 and ":4:" not in stats.bad.first
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": 3}]))
    with pytest.raises(DataError, match=r"a\.json: row 1: field 'instruction' must be a string"):
        sft_examples(str(arr), tok, max_len=64)
    with pytest.raises(DataError, match="no assistant turn"):
        sft_items({"messages": [{"role": "user", "content": "q"}]})


def test_truncation_is_counted(tmp_path, tok):
    p = _write(tmp_path / "t.jsonl", [{"text": "hello world " * 40}])
    exs, stats = sft_examples(p, tok, max_len=16)
    assert len(exs[0].ids) == 16 and stats.truncated == 1


def test_packing_keeps_examples_apart(tok):
    exs, _ = sft_examples_from(tok, ["hello", "world, the answer", "what is two plus two? four."])
    rows = pack(exs, 64)
    assert rows["inputs"].shape[0] == 1
    seg = rows["segment_ids"][0]
    assert sorted(set(seg.tolist())) == [0, 1, 2, 3]
    for s in (1, 2, 3):
        pos = rows["positions"][0][seg == s]
        np.testing.assert_array_equal(pos, np.arange(len(pos)))
    assert (rows["targets"][0][seg == 0] == -1).all()
    unpacked = pack(exs, 64, packed=False)
    assert unpacked["inputs"].shape[0] == 3
    assert (unpacked["targets"] >= 0).sum() == (rows["targets"] >= 0).sum()


def sft_examples_from(tok, texts):
    from smedjan.data.chat import Example

    exs = [ChatEncoder(tok).encode_text(t) for t in texts]
    return [Example(e.ids, e.mask) for e in exs], None


def test_preference_shapes(tmp_path, tok):
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    assert preference_triple(hh) == ("\n\nHuman: hi\n\nAssistant:", " hello", " go away")
    msgs = {
        "prompt": [{"role": "user", "content": "what is two plus two?"}],
        "chosen": [{"role": "assistant", "content": "four"}],
        "rejected": [{"role": "assistant", "content": "five"}],
    }
    oai = {
        "input": {"messages": msgs["prompt"]},
        "preferred_output": msgs["chosen"],
        "non_preferred_output": msgs["rejected"],
    }
    p = _write(tmp_path / "p.jsonl", [hh, msgs, oai, {"prompt": "x", "chosen": [1], "rejected": "y"}])
    with pytest.raises(DataError, match=r"p\.jsonl:4: 'prompt' is a string"):
        preference_pairs(p, tok, max_len=64)
    pairs, stats = preference_pairs(p, tok, max_len=64, skip_bad_rows=True)
    assert len(pairs) == 3 and stats.bad.count == 1
    c, r = pairs[1]
    assert tok.decode([i for i, m in zip(c.ids, c.mask) if m]) == f"four{IM_END}\n"
    assert tok.decode([i for i, m in zip(r.ids, r.mask) if m]) == f"five{IM_END}\n"
    c, r = pairs[0]
    assert c.ids[-1] == tok.eos_id and c.ids[0] == tok.bos_id
    assert pairs[2].chosen.ids == pairs[1].chosen.ids
    arr = pair_arrays(pairs, 32)
    assert arr["inputs"].shape == (3, 2, 32)
    assert ((arr["targets"][:, 0] >= 0).sum(-1) > 0).all()


def test_real_files_read(tok):
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data absent")
    exs, stats = sft_examples(str(SHARED_DATA / "sft/stanford_alpaca_seed_tasks.jsonl"), tok, max_len=128)
    assert stats.rows == 175 and stats.examples >= 175 and stats.bad.count == 0
    pairs, stats = preference_pairs(
        str(SHARED_DATA / "dpo/orca_dpo_pairs_validation_284.jsonl"), tok, max_len=128, skip_bad_rows=False
    )
    assert len(pairs) == 284

"""Preference pairs for DPO: JSONL rows -> (chosen, rejected) token sequences with completion masks.

Row shapes read:

* ``{"prompt", "chosen", "rejected"}``: each a string (the text is concatenated as written, as TRL's
  "standard" format) or a list of messages (rendered with the chat template, "conversational");
* ``{"chosen", "rejected"}`` whole dialogues (HH-RLHF): the prompt is their common prefix up to the
  last ``"\\n\\nAssistant:"`` (or, for message lists, all messages but the last);
* OpenAI's preference format ``{"input": {"messages"}, "preferred_output", "non_preferred_output"}``.

Only completion tokens are targets. String completions end with the tokenizer's eos.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smedjan.data.chat import ChatEncoder, Example, _messages, example_arrays, load_examples
from smedjan.text import DataError

HH_TURN = "\n\nAssistant:"


@dataclass
class Pair:
    chosen: Example
    rejected: Example

    def __iter__(self):
        return iter((self.chosen, self.rejected))


def _split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    k = chosen.rfind(HH_TURN)
    if k < 0 or not rejected.startswith(chosen[: k + len(HH_TURN)]):
        raise DataError(f"no 'prompt' and the dialogues do not share a prefix ending in {HH_TURN!r}")
    cut = k + len(HH_TURN)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def preference_triple(row) -> tuple[object, object, object]:
    """(prompt, chosen, rejected): all strings, or a message list and two message lists."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    if "preferred_output" in row:
        inp = row.get("input")
        if not isinstance(inp, dict):
            raise DataError("'input' must be an object with 'messages'")
        return (
            _messages(inp.get("messages"), "'input.messages'"),
            _messages(row["preferred_output"], "'preferred_output'"),
            _messages(row.get("non_preferred_output"), "'non_preferred_output'"),
        )
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(f"missing field {key!r} (keys {sorted(row)})")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if prompt is None:
        if isinstance(chosen, str) and isinstance(rejected, str):
            return _split_hh(chosen, rejected)
        c, r = _messages(chosen, "'chosen'"), _messages(rejected, "'rejected'")
        if c[:-1] != r[:-1]:
            raise DataError("no 'prompt' and 'chosen'/'rejected' differ before their last message")
        return c[:-1], c[-1:], r[-1:]
    if isinstance(prompt, str):
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise DataError("'prompt' is a string, so 'chosen' and 'rejected' must be strings too")
        return prompt, chosen, rejected
    return _messages(prompt, "'prompt'"), _messages(chosen, "'chosen'"), _messages(rejected, "'rejected'")


class PreferenceEncoder:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.chat = ChatEncoder(tokenizer)

    def encode(self, prompt, completion) -> Example:
        if isinstance(prompt, str):
            p = self.tok.encode(prompt, add_bos=True)
            c = self.tok.encode(completion, add_eos=True)
            return Example(p + c, [False] * len(p) + [True] * len(c))
        ex = self.chat.encode_messages(prompt + completion)
        # only the final completion is scored, even if the prompt holds earlier assistant turns
        n_prompt = len(self.chat.encode_messages(prompt).ids) if any(m["role"] == "assistant" for m in prompt) else 0
        ex.mask[:n_prompt] = [False] * min(n_prompt, len(ex.mask))
        return ex

    def pair(self, row, max_len: int | None = None) -> Pair:
        prompt, chosen, rejected = preference_triple(row)
        pair = Pair(self.encode(prompt, chosen), self.encode(prompt, rejected))
        if max_len:
            pair = Pair(_keep_end(pair.chosen, max_len), _keep_end(pair.rejected, max_len))
        if not sum(pair.chosen.mask[1:]) or not sum(pair.rejected.mask[1:]):
            raise DataError("an empty completion")
        return pair


def _keep_end(ex: Example, max_len: int) -> Example:
    """Too long: drop prompt tokens after the first (bos) so the completion survives (TRL's keep_end),
    then, if the completion alone is too long, its end."""
    excess = len(ex.ids) - max_len
    if excess <= 0:
        return ex
    first = ex.mask.index(True) if True in ex.mask else len(ex.mask)
    cut = min(excess, max(first - 1, 0))
    ids, mask = ex.ids[:1] + ex.ids[1 + cut :], ex.mask[:1] + ex.mask[1 + cut :]
    return Example(ids[:max_len], mask[:max_len])


def preference_pairs(paths, tokenizer, *, max_len: int, skip_bad_rows: bool = False):
    """(pairs, Stats) of every row in `paths`; a side longer than `max_len` tokens loses the start of
    its prompt first (counted as cut)."""
    enc = PreferenceEncoder(tokenizer)

    def one(row):
        full = enc.pair(row)
        cut = any(len(e.ids) > max_len for e in full)
        pair = enc.pair(row, max_len) if cut else full
        if not sum(pair.chosen.mask[1:]) or not sum(pair.rejected.mask[1:]):
            raise DataError("a completion is empty")
        one.cut += cut
        return [pair]

    one.cut = 0
    pairs, stats = load_examples(paths, one, max_len=max_len, skip_bad_rows=skip_bad_rows)
    stats.truncated += one.cut
    return pairs, stats


def pair_arrays(pairs: list[Pair], seq_len: int) -> dict[str, np.ndarray]:
    """{"inputs", "targets"} int32 [rows, 2, seq_len]: [:, 0] chosen, [:, 1] rejected, right-padded."""
    n = len(pairs)
    out = {
        "inputs": np.zeros((n, 2, seq_len), np.int32),
        "targets": np.full((n, 2, seq_len), -1, np.int32),
    }
    for i, pair in enumerate(pairs):
        for j, ex in enumerate(pair):
            inp, tgt = example_arrays(ex)
            k = min(len(inp), seq_len)
            out["inputs"][i, j, :k] = inp[:k]
            out["targets"][i, j, :k] = tgt[:k]
    return out

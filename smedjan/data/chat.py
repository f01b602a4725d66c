"""Supervised fine-tuning data: JSONL rows -> token ids with a loss mask -> packed training rows.

Row shapes read (one JSON object a line, `.gz` too; a `.json` file may hold one array of rows):

* chat          ``{"messages": [{"role": ..., "content": ...}, ...]}``
* Alpaca        ``{"instruction", "input", "output"}`` (``input`` may be empty or absent)
* self-instruct ``{"instruction", "instances": [{"input", "output"}, ...]}`` (one example per instance)
* plain text    ``{"text": ...}``

Chat rows are rendered with the tokenizer's own chat template (ChatML when it has none). The loss
mask covers the assistant turns only: each assistant turn's tokens are those between the rendering
of the conversation before it (with the generation prompt) and the rendering that includes it, so
the end-of-turn marker the template writes is learned too. Plain text is all target.

A malformed row raises `DataError` naming ``file:line``; with ``skip_bad_rows`` it is counted and
skipped instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smedjan.text import DataError, _open_text, expand_inputs

IGNORE = -1  # smedjan.train.loss.IGNORE: a target that is not counted


@dataclass
class Example:
    """One training sequence: token ids and, per token, whether it is predicted (a target)."""

    ids: list[int]
    mask: list[bool]


@dataclass
class BadRows:
    """Counts rows skipped under --skip-bad-rows (or raises on the first one)."""

    skip: bool = False
    count: int = 0
    first: str | None = None

    def __call__(self, where: str, message: str) -> None:
        if not self.skip:
            raise DataError(f"{where}: {message}")
        self.count += 1
        self.first = self.first or f"{where}: {message}"


@dataclass
class Stats:
    rows: int = 0
    examples: int = 0
    truncated: int = 0
    bad: BadRows = field(default_factory=BadRows)


def read_rows(paths) -> Iterator[tuple[str, object]]:
    """(``file:line``, parsed JSON) for every non-empty row; a `.json` file is one array of rows."""
    for path in expand_inputs(paths):
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        with _open_text(path) as f:
            if name.endswith(".json"):
                try:
                    rows = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rows, list):
                    raise DataError(f"{path}: a .json file must hold one array of rows")
                for i, row in enumerate(rows):
                    yield f"{path}: row {i}", row
                continue
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{lineno}", DataError(f"not valid JSON ({e.msg})")


def _messages(value, what: str) -> list[dict]:
    if isinstance(value, str):
        raise DataError(f"{what} is a string; expected a list of {{role, content}} messages")
    if not isinstance(value, list) or not value:
        raise DataError(f"{what} must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{what}[{i}] must be an object with string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _str(row: dict, key: str, optional: bool = False) -> str:
    v = row.get(key, "" if optional else None)
    if not isinstance(v, str):
        raise DataError(f"field {key!r} must be a string" + ("" if key in row else " (missing)"))
    return v


def _alpaca(instruction: str, inp: str, output: str) -> list[dict]:
    user = instruction if not inp.strip() else f"{instruction}\n\n{inp}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def sft_items(row) -> list[list[dict] | str]:
    """A row -> conversations (message lists) and/or plain texts; raises DataError (no location) if malformed."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = _messages(row["messages"], "'messages'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError("'messages' has no assistant turn to learn from")
        return [msgs]
    if "instances" in row and "instruction" in row:
        inst = row["instances"]
        if not isinstance(inst, list) or not inst:
            raise DataError("'instances' must be a non-empty list of {input, output}")
        out = []
        for i, x in enumerate(inst):
            if not isinstance(x, dict):
                raise DataError(f"'instances'[{i}] must be an object")
            try:
                out.append(_alpaca(_str(row, "instruction"), _str(x, "input", True), _str(x, "output")))
            except DataError as e:
                raise DataError(f"'instances'[{i}]: {e}") from None
        return out
    if "instruction" in row:
        return [_alpaca(_str(row, "instruction"), _str(row, "input", True), _str(row, "output"))]
    if "text" in row:
        return [_str(row, "text")]
    raise DataError(f"unknown row shape (keys {sorted(row)}); expected messages, instruction/output or text")


class ChatEncoder:
    """Renders conversations with a tokenizer's chat template and marks the assistant tokens."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def render(self, messages, add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            raise DataError(f"the chat template refused the conversation: {e}") from None

    def spans(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is_target) pieces, in order."""
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1], add_generation_prompt=False)
            if not before.startswith(done) or not upto.startswith(before):
                raise DataError(
                    "the chat template does not render a conversation as a prefix of its continuation; "
                    "cannot tell the assistant tokens apart"
                )
            pieces += [(before[len(done) :], False), (upto[len(before) :], True)]
            done = upto
        full = self.render(messages, add_generation_prompt=False)
        if not full.startswith(done):
            raise DataError("the chat template renders the whole conversation differently from its parts")
        pieces.append((full[len(done) :], False))
        return [(t, tgt) for t, tgt in pieces if t]

    def encode_messages(self, messages: list[dict]) -> Example:
        """The whole rendering tokenised once (so ids are exactly what inference sees); a token is a
        target when it starts inside an assistant piece."""
        text, spans, at = "", [], 0
        for piece, target in self.spans(messages):
            if target:
                spans.append((at, at + len(piece)))
            text += piece
            at += len(piece)
        ids, offsets = self.tok.encode_offsets(text)
        mask = [any(a <= start < b for a, b in spans) for start, _ in offsets]
        return Example(list(ids), mask)

    def encode_text(self, text: str) -> Example:
        ids = self.tok.encode(text, add_bos=True, add_eos=True)
        return Example(ids, [True] * len(ids))

    def encode(self, item) -> Example:
        return self.encode_text(item) if isinstance(item, str) else self.encode_messages(item)


def load_examples(
    paths, encode: Callable[[object], list[Example]], *, max_len: int, skip_bad_rows: bool = False
) -> tuple[list, Stats]:
    """Apply `encode(row) -> [items]` to every row; items longer than `max_len` tokens are cut (counted)."""
    stats = Stats(bad=BadRows(skip_bad_rows))
    out = []
    for where, row in read_rows(paths):
        stats.rows += 1
        try:
            items = encode(row)
        except DataError as e:
            stats.bad(where, str(e))
            continue
        for item in items:
            stats.truncated += _truncate(item, max_len)
            out.append(item)
    stats.examples = len(out)
    if not out:
        raise DataError(
            f"no usable examples in {paths}" + (f" (first bad row: {stats.bad.first})" if stats.bad.count else "")
        )
    return out, stats


def _truncate(item, max_len: int) -> int:
    exs = [item] if isinstance(item, Example) else list(item)
    cut = 0
    for ex in exs:
        if len(ex.ids) > max_len:
            del ex.ids[max_len:], ex.mask[max_len:]
            cut = 1
    return cut


def sft_examples(paths, tokenizer, *, max_len: int, skip_bad_rows: bool = False) -> tuple[list[Example], Stats]:
    """Every row of `paths` as Examples of at most `max_len` tokens (with --skip-bad-rows semantics)."""
    enc = ChatEncoder(tokenizer)
    exs, stats = load_examples(
        paths, lambda row: [enc.encode(x) for x in sft_items(row)], max_len=max_len, skip_bad_rows=skip_bad_rows
    )
    trainable = [e for e in exs if sum(e.mask[1:])]
    if not trainable:
        raise DataError(f"{paths}: no example has a target token")
    return trainable, stats


# ---- rows for the model ----------------------------------------------------------------------------
def example_arrays(ex: Example) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one example: next-token targets, IGNORE where the next token is not a target."""
    ids = np.asarray(ex.ids, np.int32)
    mask = np.asarray(ex.mask, bool)
    return ids[:-1], np.where(mask[1:], ids[1:], IGNORE).astype(np.int32)


def pack(examples: list[Example], seq_len: int, *, packed: bool = True, window: int = 64) -> dict[str, np.ndarray]:
    """Examples -> {"inputs", "targets", "segment_ids", "positions"} int32 [rows, seq_len].

    With `packed`, several examples share a row (first fit among the last `window` open rows): each
    keeps its own segment id (1, 2, ... within the row) and positions from 0, so attention never
    crosses from one example to another and RoPE sees each as if alone. Padding is segment 0 with
    IGNORE targets. Without `packed`, one example per row.
    """
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    fill: list[int] = []
    for ex in examples:
        inp, tgt = example_arrays(ex)
        n = min(len(inp), seq_len)
        inp, tgt = inp[:n], tgt[:n]
        if n == 0:
            continue
        slot = None
        if packed:
            for r in range(max(0, len(rows) - window), len(rows)):
                if fill[r] + n <= seq_len:
                    slot = r
                    break
        if slot is None:
            rows.append([])
            fill.append(0)
            slot = len(rows) - 1
        rows[slot].append((inp, tgt))
        fill[slot] += n
    out = {
        "inputs": np.zeros((len(rows), seq_len), np.int32),
        "targets": np.full((len(rows), seq_len), IGNORE, np.int32),
        "segment_ids": np.zeros((len(rows), seq_len), np.int32),
        "positions": np.zeros((len(rows), seq_len), np.int32),
    }
    for r, parts in enumerate(rows):
        at = 0
        for seg, (inp, tgt) in enumerate(parts, 1):
            n = len(inp)
            out["inputs"][r, at : at + n] = inp
            out["targets"][r, at : at + n] = tgt
            out["segment_ids"][r, at : at + n] = seg
            out["positions"][r, at : at + n] = np.arange(n)
            at += n
    return out


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded random `fraction` of the items held out (at least one when > 0)."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = np.random.default_rng([seed, 7]).permutation(len(items))
    n_val = min(len(items) - 1, max(1, int(round(len(items) * fraction))))
    val = set(order[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


def describe(stats: Stats, what: str = "examples") -> str:
    s = f"{stats.rows} rows -> {stats.examples} {what}"
    if stats.truncated:
        s += f", {stats.truncated} cut to the sequence length"
    if stats.bad.count:
        s += f", {stats.bad.count} bad rows skipped (first: {stats.bad.first})"
    return s


def path_list(data) -> list[str]:
    return [str(data)] if isinstance(data, (str, Path)) else [str(p) for p in data]

"""`smedjan prepare`: text -> flat token files for pre-training.

Output folder::

    train.bin    uint16 (vocab <= 65536) or uint32 tokens: <|bos|> doc <|eos|> <|bos|> doc <|eos|> ...
    val.bin      the held-out documents, same layout
    header.json  tokenizer sha256, vocab size, dtype, bos/eos ids, per-split document and token counts

Inputs are read as a stream of documents and tokenised in batches with `encode_batch`
(the Rust side runs them on every core); tokens are appended to the files as they come,
so inputs larger than memory are fine. The validation split takes every k-th document
(k = 1/val_fraction, exactly floor(n·fraction) documents), deterministic and stream-friendly.

Document boundaries: a JSONL line is one document; in text files `--split line` makes every
non-empty line a document, `blank` paragraphs separated by blank lines, `file` the whole
file, and `auto` (default) picks `blank` if the file's first MiB holds a blank line, else `line`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from smedjan.errors import UserError
from smedjan.runconfig import DataConfig
from smedjan.text import DataError, bundled_corpus, count_input_bytes, expand_inputs, iter_documents
from smedjan.tokenizer import Tokenizer, TokenizerError, train_tokenizer

HEADER = "header.json"
FORMAT = "smedjan-tokens-v1"


# ---- preparing a dataset ------------------------------------------------------------------------------
def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def is_val_doc(i: int, fraction: float) -> bool:
    """Document i is held out when floor((i+1)·f) > floor(i·f): every (1/f)-th, floor(n·f) in all."""
    return fraction > 0 and math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9)


def prepare(
    inputs,
    tokenizer_dir,
    output,
    *,
    val_fraction: float = 0.05,
    text_field: str = "text",
    split: str = "auto",
    batch_docs: int = 512,
    batch_chars: int = 4 << 20,
    progress: bool = True,
) -> dict:
    """Tokenise `inputs` into `output`/{train,val}.bin + header.json; returns the header."""
    from tqdm import tqdm

    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    paths = expand_inputs(inputs)
    tok = Tokenizer.from_dir(tokenizer_dir)
    if tok.bos_id is None or tok.eos_id is None:
        raise DataError(f"{tokenizer_dir}: tokenizer has no bos/eos token")
    dtype = token_dtype(tok.vocab_size)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / HEADER).unlink(missing_ok=True)  # a half-written folder must not look valid
    files = {s: open(output / f"{s}.bin.tmp", "wb") for s in ("train", "val")}
    counts = {s: {"documents": 0, "tokens": 0} for s in ("train", "val")}
    total = count_input_bytes(paths)
    bar = tqdm(
        total=total,
        desc="tokenising",
        unit="B" if total else " docs",
        unit_scale=bool(total),
        disable=not progress,
        dynamic_ncols=True,
    )
    n_doc = 0

    def flush(batch: list[str]):
        nonlocal n_doc
        encoded = tok.encode_batch(batch)
        chunks = {"train": [], "val": []}
        for ids in encoded:
            s = "val" if is_val_doc(n_doc, val_fraction) else "train"
            n_doc += 1
            chunks[s].append(np.asarray([tok.bos_id, *ids, tok.eos_id], dtype=dtype))
        for s, parts in chunks.items():
            if parts:
                arr = np.concatenate(parts)
                arr.tofile(files[s])
                counts[s]["documents"] += len(parts)
                counts[s]["tokens"] += int(arr.size)
        bar.update(sum(len(t.encode("utf-8", "replace")) for t in batch) if bar.total else len(batch))

    try:
        batch, chars = [], 0
        for doc in iter_documents(paths, text_field=text_field, split=split):
            batch.append(doc)
            chars += len(doc)
            if len(batch) >= batch_docs or chars >= batch_chars:
                flush(batch)
                batch, chars = [], 0
        if batch:
            flush(batch)
        if bar.total:
            bar.update(max(0, bar.total - bar.n))  # newlines between documents are not counted above
    finally:
        for f in files.values():
            f.close()
        bar.close()

    if n_doc == 0:
        raise DataError(f"no text found in {', '.join(map(str, paths))}")
    if val_fraction > 0 and counts["val"]["documents"] == 0:
        need = math.ceil(1 / val_fraction)
        raise DataError(
            f"only {n_doc} document(s): --val-fraction {val_fraction} needs at least {need} "
            f"(or pass --val-fraction 0, or --split line for one document per line)"
        )
    for s in files:
        os.replace(output / f"{s}.bin.tmp", output / f"{s}.bin")
    header = {
        "format": FORMAT,
        "tokenizer_sha256": tok.hash,
        "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "documents": n_doc,
        "tokens": counts["train"]["tokens"] + counts["val"]["tokens"],
        "val_fraction": val_fraction,
        "splits": {s: {"file": f"{s}.bin", **counts[s]} for s in ("train", "val")},
        "inputs": [str(p) for p in paths],
    }
    tmp = output / (HEADER + ".tmp")
    tmp.write_text(json.dumps(header, indent=2) + "\n")
    os.replace(tmp, output / HEADER)
    return header


# ---- reading a prepared dataset --------------------------------------------------------------------
class TokenDataset:
    """A prepared folder; `tokens(split)` is a read-only memmap (stream) or an in-memory array."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / HEADER
        if not path.is_file():
            raise DataError(f"{self.folder}: no {HEADER} (prepare one with `smedjan prepare`)")
        try:
            self.header = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if self.header.get("format") != FORMAT:
            raise DataError(f"{path}: unknown format {self.header.get('format')!r}")
        self.dtype = np.dtype(self.header["dtype"])
        for info in self.header["splits"].values():
            f = self.folder / info["file"]
            expected = info["tokens"] * self.dtype.itemsize
            if not f.is_file() or f.stat().st_size != expected:
                raise DataError(f"{f}: missing or truncated (expected {expected} bytes)")

    @property
    def vocab_size(self) -> int:
        return int(self.header["vocab_size"])

    @property
    def tokenizer_hash(self) -> str:
        return self.header["tokenizer_sha256"]

    def check_tokenizer(self, tokenizer_dir: str | os.PathLike) -> None:

        tok_hash = Tokenizer.from_dir(tokenizer_dir).hash
        if tok_hash != self.tokenizer_hash:
            raise DataError(
                f"dataset {self.folder} was tokenised with a different tokenizer "
                f"(sha256 {self.tokenizer_hash[:12]}…) than {tokenizer_dir} ({tok_hash[:12]}…); "
                f"re-run `smedjan prepare` with this tokenizer"
            )

    def num_tokens(self, split: str = "train") -> int:
        return int(self.header["splits"][split]["tokens"])

    def tokens(self, split: str = "train", stream: bool = True) -> np.ndarray:
        path = self.folder / self.header["splits"][split]["file"]
        n = self.num_tokens(split)
        if n == 0:
            return np.zeros((0,), self.dtype)
        if stream:
            return np.memmap(path, dtype=self.dtype, mode="r", shape=(n,))
        return np.fromfile(path, dtype=self.dtype, count=n)


# ---- CLI -----------------------------------------------------------------------------------------------
def prepare_corpus(out: Path, data: DataConfig) -> DataConfig:
    """`data.corpus` -> tokenizer (OUT/tokenizer unless `data.tokenizer`) and OUT/data, each rebuilt only
    when missing or stale; returns `data` pointing at both."""
    inputs = [str(bundled_corpus()) if c == "bundled" else c for c in data.corpus]
    tok_dir = Path(data.tokenizer) if data.tokenizer else out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        if data.tokenizer:
            raise DataError(f"{data.tokenizer}: no tokenizer.json")
        print(
            f"training a {data.tokenizer_vocab}-token BPE tokenizer on {', '.join(inputs)} -> {tok_dir}",
            file=sys.stderr,
        )
        train_tokenizer(inputs, tok_dir, data.tokenizer_vocab, text_field=data.text_field, split=data.split)
    data_dir = out / "data"
    fresh = False
    try:
        ds = TokenDataset(data_dir)
        fresh = (
            ds.tokenizer_hash == Tokenizer.from_dir(tok_dir).hash
            and ds.header.get("inputs") == [str(Path(i)) for i in inputs]
            and ds.header.get("val_fraction") == data.val_fraction
        )
    except ValueError:
        pass
    if not fresh:
        print(f"preparing {data_dir}", file=sys.stderr)
        h = prepare(
            inputs, tok_dir, data_dir, val_fraction=data.val_fraction, text_field=data.text_field, split=data.split
        )
        print(
            f"  {h['documents']} documents, {h['tokens']:,} tokens (val {h['splits']['val']['tokens']:,})",
            file=sys.stderr,
        )
    return dataclasses.replace(data, dataset=str(data_dir), tokenizer=str(tok_dir))


def run(args) -> int:

    try:
        h = prepare(
            args.input,
            args.tokenizer,
            args.output,
            val_fraction=args.val_fraction,
            text_field=args.text_field,
            split=args.split,
            batch_docs=args.batch_docs,
        )
    except (DataError, TokenizerError) as e:
        raise UserError(str(e)) from None
    tr, va = h["splits"]["train"], h["splits"]["val"]
    print(
        f"wrote {args.output}: {h['documents']} documents, {h['tokens']:,} tokens ({h['dtype']}); "
        f"train {tr['documents']} docs / {tr['tokens']:,} tokens, val {va['documents']} docs / {va['tokens']:,} tokens"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("prepare", help="tokenise text into flat token files with a validation split")
    p.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files (or .gz of them), globs allowed")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (tokenizer.json)")
    p.add_argument("--output", required=True, help="dataset folder to write")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out for validation")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument(
        "--split",
        choices=["auto", "line", "blank", "file"],
        default="auto",
        help="document boundaries in .txt files (auto: blank lines if any, else lines)",
    )
    p.add_argument("--batch-docs", type=int, default=512, help="documents per encode_batch call")
    p.set_defaults(func=run)

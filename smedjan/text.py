"""Reading text corpora: paths, globs and folders to a stream of documents (txt, md, jsonl, gz).

Shared by the tokenizer trainer and `prepare`, so it sits below both.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

from smedjan.errors import UserError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".md", ".text")


class DataError(UserError, ValueError):
    """Bad data input or a dataset that does not fit the run."""


def bundled_corpus() -> Path:
    """The packaged Shakespeare corpus (smedjan/corpus/tinyshakespeare.txt.gz); `--corpus bundled`."""
    return Path(__file__).resolve().parent / "corpus" / "tinyshakespeare.txt.gz"


# ---- reading documents ------------------------------------------------------------------------------
def expand_inputs(patterns: list[str] | str) -> list[Path]:
    """Files from paths, globs and folders (a folder contributes its .txt/.jsonl(.gz) files)."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out: list[Path] = []
    for pat in patterns:
        pat = str(pat)
        if any(c in pat for c in "*?["):
            matches = sorted(glob.glob(pat, recursive=True))
            if not matches:
                raise DataError(f"{pat}: no files match")
            out.extend(Path(m) for m in matches if Path(m).is_file())
        elif Path(pat).is_dir():
            files = sorted(p for p in Path(pat).rglob("*") if p.is_file() and _base_suffix(p) in TEXT_SUFFIXES)
            if not files:
                raise DataError(f"{pat}: folder holds no .txt/.jsonl files")
            out.extend(files)
        elif Path(pat).is_file():
            out.append(Path(pat))
        else:
            raise DataError(f"{pat}: no such file")
    if not out:
        raise DataError("no input files")
    return out


def _base_suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return os.path.splitext(name)[1]


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def count_input_bytes(paths: list[Path]) -> int | None:
    """Uncompressed size for progress bars (None when a .gz hides it)."""
    if any(p.name.lower().endswith(".gz") for p in paths):
        return None
    return sum(p.stat().st_size for p in paths)


def iter_documents(paths: list[Path], text_field: str = "text", split: str = "auto") -> Iterator[str]:
    """Stream documents (non-empty strings) from every input, in order."""
    if split not in ("auto", "line", "blank", "file"):
        raise DataError(f"split must be auto, line, blank or file, got {split!r}")
    for path in paths:
        if _base_suffix(path) in (".jsonl", ".json"):
            yield from _iter_jsonl(path, text_field)
        else:
            yield from _iter_text(path, split)


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"{path}:{lineno}: no field {field!r} (has {keys}); pick one with --text-field")
            text = obj[field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not a string")
            if text.strip():
                yield text


def _iter_text(path: Path, split: str) -> Iterator[str]:
    with _open_text(path) as f:
        if split == "auto":
            head = f.read(1 << 20)
            split = "blank" if "\n\n" in head.replace("\r\n", "\n") else "line"
            lines = _chain_lines(head, f)
        else:
            lines = iter(f)
        if split == "file":
            text = "".join(lines)
            if text.strip():
                yield text
            return
        if split == "line":
            for line in lines:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line
            return
        para: list[str] = []
        for line in lines:
            if line.strip():
                para.append(line)
            elif para:
                yield "".join(para).rstrip("\r\n")
                para = []
        if para:
            yield "".join(para).rstrip("\r\n")


def _chain_lines(head: str, f) -> Iterator[str]:
    """Lines of `head` followed by the rest of the file, with the line `head` cut in two rejoined."""
    parts = head.splitlines(keepends=True)
    if parts and not parts[-1].endswith("\n"):
        rest = f.readline()
        parts[-1] += rest
    yield from parts
    yield from f

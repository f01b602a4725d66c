"""Batches from a flat token array: a seeded, resumable window sampler and a device prefetcher.

Batch i is a pure function of (seed, i): `np.random.default_rng([seed, i])` draws the window
starts. The sampler's whole state is therefore the counter i (= optimizer steps taken), which
makes resume exact and needs no shuffle buffer. With `--stream` the tokens are a `np.memmap`, so
only the sampled windows are ever read from disk.
"""

from __future__ import annotations

import queue
import threading

import numpy as np


class WindowSampler:
    """Random [B, S+1] windows of a 1-D token array (in memory or memmap)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, rows: slice | None = None):
        if tokens.shape[0] < seq_len + 1:
            raise ValueError(
                f"the training split has {tokens.shape[0]} tokens, fewer than one window of seq_len+1 = {seq_len + 1}"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rows = rows or slice(0, batch_size)  # this process's rows of the global batch

    def starts(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, index])
        return rng.integers(0, self.tokens.shape[0] - self.seq_len, size=self.batch_size)[self.rows]

    def batch(self, index: int) -> np.ndarray:
        w = self.seq_len + 1
        return np.stack([np.asarray(self.tokens[s : s + w], dtype=np.int32) for s in self.starts(index)])


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None):
    """Consecutive non-overlapping windows of the validation split as {"inputs", "targets"} batches.

    The last window may be short and the last batch partly empty: padding has target -1 (ignored),
    so the mean loss counts every real token exactly once.
    """
    n = tokens.shape[0]
    if n < 2:
        return []
    windows = []
    for s in range(0, n - 1, seq_len):
        seg = np.asarray(tokens[s : s + seq_len + 1], dtype=np.int32)
        inp = np.zeros(seq_len, np.int32)
        tgt = np.full(seq_len, -1, np.int32)
        inp[: len(seg) - 1] = seg[:-1]
        tgt[: len(seg) - 1] = seg[1:]
        windows.append((inp, tgt))
        if max_batches and len(windows) >= max_batches * batch_size:
            break
    out = []
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        inp = np.zeros((batch_size, seq_len), np.int32)
        tgt = np.full((batch_size, seq_len), -1, np.int32)
        for j, (a, b) in enumerate(chunk):
            inp[j], tgt[j] = a, b
        out.append({"inputs": inp, "targets": tgt})
    return out


class RowSampler:
    """Batches of whole rows (packed SFT rows, preference pairs) from arrays [N, ...]: epoch e visits the
    rows in the order of `default_rng([seed, e]).permutation(N)`, so batch i is a pure function of
    (seed, i) and resume is exact, as for `WindowSampler`."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int = 0, rows: slice | None = None):
        self.arrays = arrays
        self.n = len(next(iter(arrays.values())))
        if self.n == 0:
            raise ValueError("no training rows")
        self.batch_size = batch_size
        self.seed = seed
        self.rows = rows or slice(0, batch_size)
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm[1]

    def indices(self, index: int) -> np.ndarray:
        pos = np.arange(index * self.batch_size, (index + 1) * self.batch_size)[self.rows]
        return np.array([self._order(int(p // self.n))[p % self.n] for p in pos])

    def batch(self, index: int) -> dict[str, np.ndarray]:
        idx = self.indices(index)
        return {k: v[idx] for k, v in self.arrays.items()}


def eval_rows(arrays: dict[str, np.ndarray], batch_size: int, max_batches: int | None = None) -> list[dict]:
    """Rows in order as whole batches; the last is filled with empty rows (inputs 0, targets -1, so
    nothing in them is counted)."""
    n = len(next(iter(arrays.values()))) if arrays else 0
    if max_batches:
        n = min(n, max_batches * batch_size)
    out = []
    for i in range(0, n, batch_size):
        b = {}
        for k, v in arrays.items():
            part = v[i : min(i + batch_size, n)]
            pad = np.full((batch_size - len(part), *v.shape[1:]), -1 if k == "targets" else 0, v.dtype)
            b[k] = np.concatenate([part, pad])
        out.append(b)
    return out


class Prefetcher:
    """Builds batch i+1, i+2, ... on a thread and puts them on device while step i runs."""

    def __init__(self, make_batch, put, start: int, depth: int = 2):
        self._make, self._put = make_batch, put
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._next = start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        i = self._next
        while not self._stop.is_set():
            try:
                item = (i, self._put(self._make(i)), None)
            except Exception as e:  # surfaced in the consumer
                item = (i, None, e)
            while not self._stop.is_set():
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            i += 1

    def next(self):
        i, batch, err = self._q.get()
        if err is not None:
            raise err
        return i, batch

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)

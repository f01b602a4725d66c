"""Continuous batching: a background thread drives the jitted prefill/decode steps.

The KV cache has `max_batch` slots of `max_seq_len` positions. Every iteration the
scheduler

1. admits waiting requests into free slots (one prefill each, prompt padded to a
   power-of-two bucket; while others are decoding at most `max_prefills_per_step`
   per iteration, so running streams keep flowing),
2. frees the slots of cancelled requests (client gone),
3. runs a chunk of decode steps (`decode_chunk`, default 8, in one dispatch; a single step
   while requests wait for a slot) for every occupied slot, and hands each request its tokens.

So requests join and leave the running batch at every dispatch. Chunking matters because
one dispatch of a step costs the host more than the GPU work it launches (1b, batch 64 on an
H100: ~5 ms per dispatched step against ~1.5 ms of GPU time); a request that stops inside a
chunk has its remaining tokens of that chunk dropped. Tokens reach callers
through a per-request sink (a callable; the default one feeds a thread-safe queue,
the HTTP server's feeds an asyncio queue via call_soon_threadsafe). The waiting
queue is bounded: `submit` raises QueueFull when it is full (HTTP 429).

No FastAPI here: the benchmark and `smedjan chat` use the engine directly.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field

import jax
import numpy as np

from smedjan.config import ModelConfig
from smedjan.infer.runner import MIN_BUCKET, Runner
from smedjan.infer.sampling import MAX_TOP_LOGPROBS, SamplingParams
from smedjan.infer.speculative import Speculation
from smedjan.infer.stream import TextStream

log = logging.getLogger("smedjan.serve")


class QueueFull(Exception):
    """The waiting queue is at capacity."""


class EngineClosed(Exception):
    """The engine is shut down."""


@dataclass
class TokenEvent:
    """What a request receives after each step: new tokens, the text they add, maybe the end."""

    token_ids: list[int]
    text: str
    logprobs: list[dict] = field(default_factory=list)  # per token {"id", "logprob", "top": [(id, lp), ...]}
    finish_reason: str | None = None  # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Request:
    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink=None):
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.queue: queue.Queue | None = None
        if sink is None:
            self.queue = queue.Queue()
            sink = self.queue.put
        self.sink = sink
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.output_ids: list[int] = []
        self.n_generated = 0
        self.max_new = params.max_new_tokens
        self.stream: TextStream | None = None
        self.slot: int | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.adapter = 0  # index into the engine's LoRA adapters (0: the base)

    def cancel(self):
        """Stop generating (e.g. the client disconnected); the slot is freed at the next step."""
        self.cancelled.set()

    def __iter__(self):
        """Blocking iteration over events (default queue sink only)."""
        if self.queue is None:
            raise TypeError("this request was submitted with a custom sink")
        while True:
            ev = self.queue.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def result(self) -> tuple[list[int], str, str]:
        """Block until done: (token ids, text, finish_reason)."""
        ids, text, reason = [], [], None
        for ev in self:
            ids += ev.token_ids
            text.append(ev.text)
            reason = ev.finish_reason
            if ev.error:
                raise RuntimeError(ev.error)
        return ids, "".join(text), reason


class Engine:
    def __init__(
        self,
        params: dict,
        cfg: ModelConfig,
        tokenizer=None,
        *,
        max_batch: int = 64,
        max_seq_len: int | None = None,
        max_queue: int = 256,
        dtype=None,
        attn_impl: str = "auto",
        stop_token_ids=(),
        max_prefills_per_step: int = 4,
        min_kv_bucket: int = MIN_BUCKET,
        cache_dtype=None,
        decode_chunk: int = 8,
        speculation: Speculation | None = None,
        adapters: dict | None = None,
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_seq_len = int(max_seq_len or cfg.max_position_embeddings)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.max_prefills_per_step = max_prefills_per_step
        self.decode_chunk = max(1, int(decode_chunk))
        # prompt lookup for requests that ask for it (SamplingParams.speculative); k tokens proposed per step
        self.speculation = (speculation or Speculation("ngram")).validate()
        self.spec_proposed = self.spec_accepted = 0
        self.runner = Runner(
            params,
            cfg,
            max_batch,
            self.max_seq_len,
            dtype=dtype,
            attn_impl=attn_impl,
            cache_dtype=cache_dtype,
            min_kv_bucket=min_kv_bucket,
            adapters=list((adapters or {}).values()),
        )
        # LoRA adapters served beside the base in the same batch: a request names one (`submit`'s adapter)
        self.adapter_names = list(adapters or {})
        self.slots: list[Request | None] = [None] * max_batch
        self._pending: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.tokens_generated = 0

    # ---- public API -------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="smedjan-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0):
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    @property
    def num_active(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def num_queued(self) -> int:
        return len(self._pending)

    def check_prompt(self, n_prompt: int, max_new_tokens: int | None) -> None:
        """ValueError(param, message) when a request cannot fit the context."""
        if n_prompt < 1:
            raise ValueError("prompt", "the prompt is empty")
        if n_prompt >= self.max_seq_len:
            raise ValueError(
                "prompt",
                f"This model's maximum context length is {self.max_seq_len} tokens. "
                f"However, your prompt has {n_prompt} tokens.",
            )
        if max_new_tokens is not None and n_prompt + max_new_tokens > self.max_seq_len:
            raise ValueError(
                "max_tokens",
                f"This model's maximum context length is {self.max_seq_len} tokens. "
                f"However, you requested {n_prompt + max_new_tokens} tokens ({n_prompt} in the "
                f"prompt, {max_new_tokens} for the completion). Please reduce the prompt or "
                f"max_tokens.",
            )

    def submit(
        self, prompt_ids: list[int], params: SamplingParams | None = None, sink=None, adapter: str | None = None
    ) -> Request:
        """Queue a request; `adapter`: the name of one of the engine's LoRA adapters (None: the base)."""
        params = (params or SamplingParams()).validate()
        if adapter is not None and adapter not in self.adapter_names:
            raise ValueError("model", f"no adapter named {adapter!r}; served: {self.adapter_names}")
        self.check_prompt(len(prompt_ids), None)
        if any(not 0 <= int(t) < self.cfg.vocab_size for t in prompt_ids):
            raise ValueError("prompt", f"token ids must be in [0, {self.cfg.vocab_size})")
        req = Request(prompt_ids, params, sink)
        req.adapter = 0 if adapter is None else 1 + self.adapter_names.index(adapter)
        req.max_new = min(params.max_new_tokens, self.max_seq_len - len(prompt_ids))
        if self.tokenizer is not None:
            req.stream = TextStream(self.tokenizer, params.stop, prompt_tail=req.prompt_ids[-6:])
        with self._cv:
            if self._closing:
                raise EngineClosed("the engine is shut down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self._pending.append(req)
            self._cv.notify_all()
        return req

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None, adapter=None) -> list[int]:
        return self.submit(prompt_ids, params, adapter=adapter).result()[0]

    # ---- the scheduler thread ------------------------------------------------------------
    def _loop(self):
        while True:
            with self._cv:
                while not self._closing and not self._pending and self.num_active == 0:
                    self._cv.wait()
                if self._closing:
                    break
                free = [i for i, r in enumerate(self.slots) if r is None]
                budget = self.max_prefills_per_step if self.num_active else len(free)
                admits = []
                while self._pending and free and len(admits) < budget:
                    r = self._pending.popleft()
                    if r.cancelled.is_set():
                        r.finished.set()
                        continue
                    admits.append((free.pop(0), r))
            try:
                for slot, r in admits:
                    try:
                        self._prefill(slot, r)
                    except Exception as e:
                        self._fail_row(r, e)
                self._reap_cancelled()
                if self.num_active:
                    self._decode()
            except Exception as e:  # the batched step itself failed: no one row to blame
                log.exception("engine step failed; failing the running requests and resetting the cache")
                for r in [r for r in self.slots if r is not None] + [r for _, r in admits]:
                    self._finish(r, "error", error=f"generation failed: {type(e).__name__}: {e}")
                self.runner.reset()
        # Shutdown: whoever is still waiting gets an error event.
        for r in list(self._pending) + [r for r in self.slots if r is not None]:
            self._finish(r, "error", error="the server is shutting down")
        self._pending.clear()

    def _top_n(self) -> int:
        return MAX_TOP_LOGPROBS if any(r is not None and r.params.top_logprobs for r in self.slots) else 0

    def _prefill(self, slot: int, r: Request):
        seed = r.params.seed if r.params.seed is not None else secrets.randbits(32)
        top_n = MAX_TOP_LOGPROBS if r.params.top_logprobs else 0
        self.slots[slot] = r
        r.slot = slot
        out = self.runner.prefill([slot], [r.prompt_ids], [r.params.row(seed)], top_n=top_n, adapters=[r.adapter])
        out = jax.device_get(out)
        self._on_token(slot, 0, out)

    def _fail_row(self, r: Request, e: Exception):
        """Finish one request whose own work failed (its prefill, its sampling parameters, its text
        stream), leaving the other rows running. Only when the failure took the shared device state
        with it (donated buffers gone) is there nothing left to run on: then it is everyone's."""
        log.error("request %d failed: %s: %s", r.id, type(e).__name__, e, exc_info=e)
        self._finish(r, "error", error=f"generation failed: {type(e).__name__}: {e}")
        if any(x.is_deleted() for x in jax.tree.leaves(self.runner.state) if isinstance(x, jax.Array)):
            raise e

    def _reap_cancelled(self):
        for r in self.slots:
            if r is not None and r.cancelled.is_set():
                self._finish(r, "cancelled")

    def _chunk(self, active: np.ndarray) -> int:
        """Decode steps for the next dispatch: up to `decode_chunk` (a power of two, so few compiles),
        no more than the longest remaining request needs, and one while requests wait for a free slot
        (so they are admitted at the next step)."""
        if self._pending and not active.all():
            return 1
        left = max(r.max_new - r.n_generated for r in self.slots if r is not None)
        k = 1
        while k * 2 <= min(self.decode_chunk, left):
            k *= 2
        return k

    def _speculating(self, active: np.ndarray) -> np.ndarray | None:
        """The rows of a prompt-lookup round, when one runs: some request asked for it and no running request
        needs what a round does not give (penalties applied, logprobs)."""
        running = [r for r in self.slots if r is not None]
        if not any(r.params.speculative for r in running):
            return None
        if any(r.params.penalized or r.params.logprobs or r.params.top_logprobs for r in running):
            return None
        return np.array([r is not None and r.params.speculative for r in self.slots])

    def _decode_speculative(self, active: np.ndarray, spec_rows: np.ndarray):
        sampled = any(r is not None and r.params.temperature > 0 for r in self.slots)
        out = self.runner.lookup_step(active, spec_rows, self.speculation, sampled)
        self.steps += 1
        self.spec_proposed += int(out["proposed"].sum())
        self.spec_accepted += int(out["n"][spec_rows].sum())
        for i in np.nonzero(active)[0]:
            r = self.slots[i]
            for j in range(int(out["n"][i]) + 1):
                if self.slots[i] is not r:  # finished inside the round: the rest is dropped
                    break
                try:
                    self._on_token(int(i), 0, {"tok": out["toks"][i, j : j + 1]})
                except Exception as e:
                    self._fail_row(r, e)

    def _decode(self):
        active = np.array([r is not None for r in self.slots])
        spec_rows = self._speculating(active)
        if spec_rows is not None:
            return self._decode_speculative(active, spec_rows)
        k = self._chunk(active)
        out = jax.device_get(self.runner.step(active, top_n=self._top_n(), n_steps=k))
        self.steps += k
        running = [(int(i), self.slots[i]) for i in np.nonzero(active)[0]]
        for j in range(k):
            step_out = {name: v[j] for name, v in out.items()}
            for i, r in running:
                if self.slots[i] is r:  # not finished earlier in this chunk, nor cancelled
                    try:
                        self._on_token(i, i, step_out)
                    except Exception as e:
                        self._fail_row(r, e)

    def _on_token(self, slot: int, row: int, out: dict):
        r = self.slots[slot]
        tok = int(out["tok"][row])
        r.n_generated += 1
        self.tokens_generated += 1
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        p = r.params
        lp = []
        if p.logprobs or p.top_logprobs:
            entry = {"id": tok, "logprob": float(out["logprob"][row])}
            if p.top_logprobs and "top_ids" in out:
                entry["top"] = [
                    (int(a), float(b))
                    for a, b in zip(out["top_ids"][row][: p.top_logprobs], out["top_logprobs"][row][: p.top_logprobs])
                ]
            lp = [entry]
        if (tok in self.stop_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            text = r.stream.flush() if r.stream else ""
            self._emit(r, TokenEvent([], text, []))
            self._finish(r, "stop")
            return
        r.output_ids.append(tok)
        text = r.stream.add(tok) if r.stream else ""
        if r.stream is not None and r.stream.stopped:
            self._emit(r, TokenEvent([tok], text, lp))
            self._finish(r, "stop")
            return
        if r.n_generated >= r.max_new:
            text += r.stream.flush() if r.stream else ""
            self._emit(r, TokenEvent([tok], text, lp))
            self._finish(r, "length")
            return
        self._emit(r, TokenEvent([tok], text, lp))

    def _emit(self, r: Request, ev: TokenEvent):
        if not ev.token_ids and not ev.text and ev.finish_reason is None:
            return
        try:
            r.sink(ev)
        except Exception:  # the consumer is gone (closed event loop...): stop generating for it
            r.cancel()

    def _finish(self, r: Request, reason: str, error: str | None = None):
        if r.finished.is_set():
            return
        if r.slot is not None and self.slots[r.slot] is r:
            self.slots[r.slot] = None
        r.finished.set()
        ev = TokenEvent(
            [],
            "",
            [],
            finish_reason=reason,
            prompt_tokens=len(r.prompt_ids),
            completion_tokens=r.n_generated,
            error=error,
        )
        try:
            r.sink(ev)
        except Exception:
            pass

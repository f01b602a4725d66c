"""OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI).

GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(non-streaming, and SSE streaming ending with `data: [DONE]`). Every error is an
OpenAI-style JSON body {"error": {"message", "type", "param", "code"}}: 400 for bad
input, 401 for a bad API key, 413 for a body over `max_body_bytes` (checked while reading,
before any parsing), 415 for a POST body that is not application/json, 429 when the engine's
queue is full. A client that disconnects has its requests cancelled, freeing their batch slots.

Browser safety: a page on another origin can make a browser send a "simple" POST (text/plain,
no preflight) to a server on localhost; requiring application/json forces a CORS preflight,
which fails unless the origin was allowed with `cors_origins`. `allowed_hosts` refuses other
Host headers (DNS rebinding). With an API key, every route but /health needs it (the OpenAPI
schema too), and /health says no more than "ok" to a caller without it.

Parsing, chat templating and tokenising run in worker threads, so a large request never stalls
the event loop (the streams of others, /health); a prompt longer in characters than the context
could hold is refused before it is tokenised at all.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from smedjan.infer.stream import decode_text
from smedjan.serve.engine import Engine, EngineClosed, QueueFull
from smedjan.serve.protocol import APIError, GenRequest, parse_chat, parse_completion, parse_json


def _error_response(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


async def read_body(request: Request, limit: int) -> bytes:
    """The JSON request body, refused with 415 unless declared application/json and with 413 as
    soon as it is known to exceed `limit` bytes."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {ctype!r}", None, "unsupported_media_type")
    too_big = APIError(413, f"The request body exceeds {limit} bytes.", None, "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    engine: Engine,
    tokenizer,
    model_name: str,
    api_key: str | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    cors_origins: tuple[str, ...] = (),
    allowed_hosts: tuple[str, ...] = (),
) -> FastAPI:
    app = FastAPI(title="smedjan", docs_url=None, redoc_url=None)
    created = int(time.time())
    app.state.engine = engine
    # `chars > context * this` proves a prompt too long without tokenising it (doubled for
    # normalisers that compose characters, which can make the text shorter than its tokens say).
    chars_per_token = 2 * tokenizer.max_token_chars if hasattr(tokenizer, "max_token_chars") else None

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return _error_response(APIError(400, f"invalid request: {e.errors()}", None, "invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error_response(
            APIError(
                e.status_code,
                str(e.detail),
                None,
                code,
                "invalid_request_error" if e.status_code < 500 else "server_error",
            )
        )

    @app.exception_handler(Exception)
    async def _unexpected(request, e):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error"))

    def _authorised(request: Request) -> bool:
        if not api_key:
            return True
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else None
        return token is not None and secrets.compare_digest(token.encode(), api_key.encode())

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path != "/health" and not _authorised(request):
            return _error_response(APIError(401, "Incorrect API key provided.", None, "invalid_api_key"))
        return await call_next(request)

    # Added after _auth, so they run before it: a CORS preflight carries no key.
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    @app.get("/health")
    async def health(request: Request):
        if not _authorised(request):
            return {"status": "ok"}
        return {"status": "ok", "model": model_name, "active": engine.num_active, "queued": engine.num_queued}

    def _model_card():
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "smedjan",
            "max_model_len": engine.max_seq_len,
        }

    served = [model_name, *engine.adapter_names]  # the base, then its LoRA adapters (`serve --lora`)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [dict(_model_card(), id=m) for m in served]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in served:
            raise APIError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")
        return dict(_model_card(), id=model_id)

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await read_body(request, max_body_bytes)
        return await _serve(request, await run_in_threadpool(lambda: parse_completion(parse_json(raw))))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await read_body(request, max_body_bytes)
        return await _serve(request, await run_in_threadpool(lambda: parse_chat(parse_json(raw))))

    # ---- shared machinery ----------------------------------------------------------------------
    def _check_chars(n_chars: int, param: str):
        if chars_per_token is not None and n_chars > engine.max_seq_len * chars_per_token:
            raise APIError(
                400,
                f"This model's maximum context length is {engine.max_seq_len} tokens. However, your "
                f"{param} has {n_chars} characters, more than that many tokens can hold.",
                param,
                "context_length_exceeded",
            )

    def _encode(req: GenRequest) -> list[list[int]]:
        """Token ids per prompt; blocking work (templating, tokenising): call it in a thread."""
        if req.model not in served:
            raise APIError(
                400,
                f"The model '{req.model}' does not exist; this server serves {', '.join(map(repr, served))}",
                "model",
                "model_not_found",
            )
        if req.chat:
            _check_chars(sum(len(m["content"]) for m in req.messages), "messages")
            try:
                text = tokenizer.apply_chat_template(req.messages, add_generation_prompt=True)
            except Exception as e:  # template errors (raise_exception in the template, bad roles...)
                why = getattr(e, "reason", e)  # a TokenizerError's reason leaves out the server's file paths
                raise APIError(400, f"could not apply the chat template: {why}", "messages", "invalid_value") from None
            return [tokenizer.encode(text, add_bos=False)]
        out = []
        for p in req.prompts:
            if isinstance(p, str):
                _check_chars(len(p), "prompt")
            ids = tokenizer.encode_prompt(p) if isinstance(p, str) else p
            if any(not 0 <= t < engine.cfg.vocab_size for t in ids):
                raise APIError(400, f"token ids must be in [0, {engine.cfg.vocab_size})", "prompt", "invalid_value")
            out.append(ids)
        return out

    def _submit_all(req: GenRequest, prompt_ids: list[list[int]], sink_for):
        for ids in prompt_ids:
            try:
                engine.check_prompt(len(ids), req.max_tokens)
            except ValueError as e:
                raise APIError(400, e.args[1], e.args[0], "context_length_exceeded") from None
        submitted = []
        try:
            for pi, ids in enumerate(prompt_ids):
                max_new = req.max_tokens or (engine.max_seq_len - len(ids))
                for j in range(req.n):
                    index = pi * req.n + j
                    params = req.params
                    params = type(params)(
                        **{
                            **params.__dict__,
                            "max_new_tokens": max_new,
                            "seed": None if params.seed is None else params.seed + j,
                        }
                    )
                    adapter = None if req.model == model_name else req.model
                    submitted.append(engine.submit(ids, params, sink=sink_for(index), adapter=adapter))
        except QueueFull as e:
            for r in submitted:
                r.cancel()
            raise APIError(429, f"The server is overloaded: {e}. Retry later.", None, "queue_full") from None
        except EngineClosed as e:
            for r in submitted:
                r.cancel()
            raise APIError(503, str(e), None, "unavailable") from None
        except ValueError as e:
            for r in submitted:
                r.cancel()
            raise APIError(400, e.args[-1], e.args[0] if len(e.args) == 2 else None, "invalid_value") from None
        return submitted

    def _tok_str(t: int) -> str:
        return decode_text(tokenizer, [t])

    def _logprobs_chat(entries):
        out = []
        for e in entries:
            s = _tok_str(e["id"])
            out.append(
                {
                    "token": s,
                    "logprob": e["logprob"],
                    "bytes": list(s.encode()),
                    "top_logprobs": [
                        {"token": _tok_str(i), "logprob": lp, "bytes": list(_tok_str(i).encode())}
                        for i, lp in e.get("top", [])
                    ],
                }
            )
        return {"content": out}

    def _logprobs_completion(entries, offset0: int):
        tokens, lps, tops, offsets = [], [], [], []
        off = offset0
        for e in entries:
            s = _tok_str(e["id"])
            tokens.append(s)
            lps.append(e["logprob"])
            tops.append({_tok_str(i): lp for i, lp in e.get("top", [])} if "top" in e else None)
            offsets.append(off)
            off += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def _serve(request: Request, req: GenRequest):
        prompt_ids = await run_in_threadpool(_encode, req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink_for(index):
            def sink(ev):
                loop.call_soon_threadsafe(events.put_nowait, (index, ev))

            return sink

        reqs = _submit_all(req, prompt_ids, sink_for)
        rid = ("chatcmpl-" if req.chat else "cmpl-") + secrets.token_hex(12)
        now = int(time.time())
        prompt_tokens = sum(len(p) for p in prompt_ids) * req.n
        if req.stream:
            return StreamingResponse(
                _stream(request, req, reqs, events, rid, now, prompt_tokens),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _collect(request, req, reqs, events, rid, now, prompt_tokens, prompt_ids)

    async def _next_event(request, events):
        """The next engine event; None if the client went away meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    return None

    async def _collect(request, req, reqs, events, rid, now, prompt_tokens, prompt_ids):
        k = len(reqs)
        texts = [[] for _ in range(k)]
        lps = [[] for _ in range(k)]
        finish = [None] * k
        completion_tokens = 0
        try:
            while any(f is None for f in finish):
                item = await _next_event(request, events)
                if item is None:
                    return JSONResponse(
                        {
                            "error": {
                                "message": "client disconnected",
                                "type": "invalid_request_error",
                                "param": None,
                                "code": "client_closed",
                            }
                        },
                        status_code=499,
                    )
                i, ev = item
                if ev.error:
                    raise APIError(503, ev.error, None, "generation_failed")
                texts[i].append(ev.text)
                lps[i] += ev.logprobs
                if ev.finish_reason is not None:
                    finish[i] = ev.finish_reason
                    completion_tokens += ev.completion_tokens
        finally:
            for r in reqs:
                r.cancel()  # no-op for finished ones; frees slots if we leave early
        choices = []
        for i in range(k):
            text = "".join(texts[i])
            if req.chat:
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": _logprobs_chat(lps[i]) if req.logprobs is not None else None,
                        "finish_reason": finish[i],
                    }
                )
            else:
                prefix = ""
                if req.echo:
                    p = req.prompts[i // req.n]
                    prefix = p if isinstance(p, str) else decode_text(tokenizer, p)
                choices.append(
                    {
                        "index": i,
                        "text": prefix + text,
                        "logprobs": (_logprobs_completion(lps[i], len(prefix)) if req.logprobs is not None else None),
                        "finish_reason": finish[i],
                    }
                )
        return {
            "id": rid,
            "object": "chat.completion" if req.chat else "text_completion",
            "created": now,
            "model": model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def _cancel_on_disconnect(request, reqs):
        """Cancel the requests as soon as the client goes away. The stream alone may notice late:
        a write into a closed socket can still succeed, and the server only reads the socket (and
        so sees the close) while someone waits on `receive`; this task is that someone."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for r in reqs:
            r.cancel()

    async def _stream(request, req, reqs, events, rid, now, prompt_tokens):
        k = len(reqs)
        obj = "chat.completion.chunk" if req.chat else "text_completion"
        finish = [None] * k
        offsets = [0] * k
        completion_tokens = 0

        def chunk(choices, usage=None):
            d = {"id": rid, "object": obj, "created": now, "model": model_name, "choices": choices}
            if req.include_usage:
                d["usage"] = usage
            return f"data: {json.dumps(d)}\n\n"

        watcher = asyncio.create_task(_cancel_on_disconnect(request, reqs))
        try:
            if req.chat:
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for i in range(k)
                    ]
                )
            while any(f is None for f in finish):
                item = await _next_event(request, events)
                if item is None:
                    return
                i, ev = item
                if ev.error:
                    err = {
                        "error": {
                            "message": ev.error,
                            "type": "server_error",
                            "param": None,
                            "code": "generation_failed",
                        }
                    }
                    yield f"data: {json.dumps(err)}\n\n"
                    return
                if ev.finish_reason is not None:
                    finish[i] = ev.finish_reason
                    completion_tokens += ev.completion_tokens
                if not ev.text and not ev.logprobs and ev.finish_reason is None:
                    continue
                if req.chat:
                    delta = {"content": ev.text} if (ev.text or ev.finish_reason is None) else {}
                    lp = _logprobs_chat(ev.logprobs) if req.logprobs is not None and ev.logprobs else None
                    yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}])
                else:
                    lp = (
                        _logprobs_completion(ev.logprobs, offsets[i])
                        if req.logprobs is not None and ev.logprobs
                        else None
                    )
                    offsets[i] += len(ev.text)
                    yield chunk([{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}])
            if req.include_usage:
                yield chunk(
                    [],
                    {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                )
            yield "data: [DONE]\n\n"
        finally:  # runs on normal end, on error and when the client disconnects (generator cancelled)
            watcher.cancel()
            for r in reqs:
                r.cancel()

    return app

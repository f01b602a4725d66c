"""The OpenAI-compatible server, exercised with the official `openai` client against a live
uvicorn on 127.0.0.1, plus the engine and `smedjan chat` with piped stdin."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from test_generate import make_tiny_checkpoint  # noqa: E402

from smedjan.checkpoint import load_hf  # noqa: E402
from smedjan.infer.cli import load_tokenizer, stop_ids_for  # noqa: E402
from smedjan.infer.sampling import SamplingParams  # noqa: E402
from smedjan.serve.app import create_app  # noqa: E402
from smedjan.serve.engine import Engine, QueueFull  # noqa: E402

API_KEY = "test-key"
MODEL = "tiny"
MAX_SEQ = 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / "tiny"
    make_tiny_checkpoint(folder)
    return folder


def _run_app(app):
    """Serve `app` with uvicorn on a free loopback port in a thread; returns (base url, stop)."""
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)

    def stop():
        srv.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def server(checkpoint):
    cfg, params = load_hf(checkpoint)
    tok = load_tokenizer(checkpoint)
    # One kv bucket (min_kv_bucket = max_seq_len): batched and sequential runs use the same kernels.
    engine = Engine(
        params,
        cfg,
        tok,
        max_batch=8,
        max_seq_len=MAX_SEQ,
        max_queue=64,
        stop_token_ids=stop_ids_for(checkpoint, cfg, tok),
        min_kv_bucket=MAX_SEQ,
    ).start()
    base, stop = _run_app(create_app(engine, tok, MODEL, api_key=API_KEY))
    yield {"base": base, "engine": engine, "tok": tok, "cfg": cfg}
    stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0, timeout=600)


def _wait_idle(engine, timeout=10.0):
    deadline = time.time() + timeout
    while engine.num_active or engine.num_queued:
        assert time.time() < deadline, f"engine still busy: {engine.num_active} active"
        time.sleep(0.05)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = httpx.get(server["base"] + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_completions(server, client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    assert full.usage.completion_tokens == 8
    assert full.usage.prompt_tokens == len(server["tok"].encode_prompt("Once upon a time"))
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8
    # logprobs and several prompts / n in one request
    lp = client.completions.create(
        model=MODEL,
        prompt=["Hello", "The smith"],
        n=2,
        max_tokens=4,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert len(lp.choices) == 4 and lp.choices[0].text == lp.choices[1].text
    assert len(lp.choices[0].logprobs.token_logprobs) == 4
    assert all(v <= 0 for v in lp.choices[0].logprobs.token_logprobs)


def test_chat(server, client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, how are you?"}]
    full = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3
    )
    msg = full.choices[0].message
    assert msg.role == "assistant" and full.choices[0].finish_reason in ("stop", "length")
    assert len(full.choices[0].logprobs.content[0].top_logprobs) == 3
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens
    # Sampled, seeded requests are reproducible.
    kw = dict(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=1.0,
        top_p=0.9,
        seed=11,
        extra_body={"top_k": 50, "ignore_eos": True},
    )
    assert (
        client.chat.completions.create(**kw).choices[0].message.content
        == client.chat.completions.create(**kw).choices[0].message.content
    )


def test_32_concurrent_requests_match_sequential(server, client):
    prompts = [f"Story {i}: the robot {'and the fox ' * (i % 5)}went" for i in range(32)]

    def run(p):
        r = client.completions.create(
            model=MODEL, prompt=p, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
        )
        return r.choices[0].text, r.choices[0].finish_reason

    sequential = [run(p) for p in prompts]
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(run, prompts))
    assert concurrent == sequential
    assert all(reason == "length" for _, reason in concurrent)
    _wait_idle(server["engine"])


def test_disconnect_mid_stream_frees_slot(server, monkeypatch):
    engine = server["engine"]
    # The tiny CPU model would finish all 50 tokens before the server even notices the disconnect;
    # 50 ms per decode step makes the run long (2.5 s) against the detection latency.
    step = engine.runner.step

    def slow_step(active, top_n=0, n_steps=1):
        time.sleep(0.05 * n_steps)
        return step(active, top_n=top_n, n_steps=n_steps)

    monkeypatch.setattr(engine.runner, "step", slow_step)
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 50,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    before = engine.tokens_generated
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", server["base"] + "/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                if got >= 2:
                    break
            assert engine.num_active == 1
        # leaving the block closes the connection mid-stream
    _wait_idle(engine, timeout=10)
    print("tokens generated before the slot was freed:", engine.tokens_generated - before)
    assert engine.tokens_generated - before < 50  # cancelled, not run to max_tokens


BAD_REQUESTS = [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", b"[1, 2, 3]"),
    ("/v1/completions", {"prompt": "hi"}),  # no model
    ("/v1/completions", {"model": "nope", "prompt": "hi"}),
    ("/v1/completions", {"model": MODEL}),  # no prompt
    ("/v1/completions", {"model": MODEL, "prompt": ""}),
    ("/v1/completions", {"model": MODEL, "prompt": 5}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10_000}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi " * 200}),  # longer than the context
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 99999]}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": True}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 9}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": 3}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 3}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 1.5}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}),
    ("/v1/chat/completions", {"model": MODEL}),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 7}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}),
    ("/v1/nothing-here", {}),
]


def test_malformed_requests_get_4xx_and_server_keeps_serving(server, client):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=server["base"], timeout=30) as h:
        for path, body in BAD_REQUESTS:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = h.post(path, content=data, headers=headers)
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], (body, err)
        r = h.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert h.get("/v1/models").status_code == 401
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="other", prompt="hi")
    out = client.completions.create(model=MODEL, prompt="still alive?", max_tokens=3, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"


# Every sampling field out of range (or of the wrong type): 400 naming the field, before the engine.
OUT_OF_RANGE = [
    ("top_k", 10**12),
    ("top_k", -2),
    ("top_k", 2.5),
    ("seed", 2**70),
    ("seed", "7"),
    ("temperature", 2.5),
    ("temperature", -0.1),
    ("top_p", -0.1),
    ("min_p", 1.5),
    ("repetition_penalty", 0),
    ("repetition_penalty", 11),
    ("presence_penalty", -2.5),
    ("frequency_penalty", 1e300),
    ("max_tokens", 2**40),
    ("n", 17),
    ("n", 0),
    ("logprobs", -1),
    ("logprobs", 6),
    ("stop", ["x"] * 17),
    ("stop", ["x" * 2000]),
    ("stop", [1]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [2**40]),
    ("stop_token_ids", list(range(65))),
    ("logit_bias", {"abc": 1}),
    ("logit_bias", {"5": 1000}),
    ("logit_bias", {"5": "x"}),
    ("logit_bias", [1, 2]),
    ("logit_bias", {"5": 1}),  # well-formed, but the sampler has no bias
    ("best_of", 3),
    ("user", 5),
    ("ignore_eos", "yes"),
]
CHAT_OUT_OF_RANGE = [("top_logprobs", 21), ("top_logprobs", -1), ("max_completion_tokens", 0)]


def test_out_of_range_fields_are_400_naming_the_field(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    cases = [("/v1/completions", {"prompt": "hi"}, f, v) for f, v in OUT_OF_RANGE]
    chat = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    cases += [("/v1/chat/completions", chat, f, v) for f, v in OUT_OF_RANGE + CHAT_OUT_OF_RANGE if f != "logprobs"]
    with httpx.Client(base_url=server["base"], timeout=30, headers=headers) as h:
        for path, base, name, value in cases:
            r = h.post(path, json={"model": MODEL, **base, name: value})
            assert r.status_code == 400, (path, name, value, r.status_code, r.text)
            assert r.json()["error"]["param"] == name, (path, name, value, r.json())


def test_faults_in_one_request_leave_the_others_running(server, client, monkeypatch):
    """Out-of-range values and requests that fault inside the engine (a prefill that raises, a
    row whose text stream raises mid-decode, a top_k past int32 given through the Python API)
    while other requests stream: those others finish with exactly their normal outputs."""
    engine = server["engine"]
    prompts = [f"Tale {i}: the smith {'forged ' * (i % 3)}a" for i in range(4)]
    kw = dict(model=MODEL, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})

    def complete(p):
        return client.completions.create(prompt=p, **kw).choices[0].text

    normal = [complete(p) for p in prompts]

    prefill_fault, decode_fault = [3, 7, 7, 7, 3], [3, 9, 9, 9, 3]
    prefill, on_token, step = engine.runner.prefill, engine._on_token, engine.runner.step

    def faulty_prefill(slots, prompt_ids, *a, **k):
        if prompt_ids[0] == prefill_fault:
            raise RuntimeError("injected prefill fault")
        return prefill(slots, prompt_ids, *a, **k)

    def faulty_on_token(slot, row, out):
        r = engine.slots[slot]
        if r.prompt_ids == decode_fault and r.n_generated == 2:
            raise RuntimeError("injected decode fault")
        return on_token(slot, row, out)

    def slow_step(active, top_n=0, n_steps=1):  # keeps the streams in flight during the barrage
        time.sleep(0.03 * n_steps)
        return step(active, top_n=top_n, n_steps=n_steps)

    monkeypatch.setattr(engine.runner, "prefill", faulty_prefill)
    monkeypatch.setattr(engine, "_on_token", faulty_on_token)
    monkeypatch.setattr(engine.runner, "step", slow_step)

    streaming = threading.Semaphore(0)

    def stream(p):
        out, first = [], True
        for c in client.completions.create(prompt=p, stream=True, **kw):
            if first:
                streaming.release()
                first = False
            out += [c.choices[0].text] if c.choices else []
        return "".join(out)

    def barrage():
        for _ in prompts:
            assert streaming.acquire(timeout=120)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        codes = []
        with httpx.Client(base_url=server["base"], timeout=60, headers=headers) as h:
            for name, value in OUT_OF_RANGE:
                codes.append(h.post("/v1/completions", json={"model": MODEL, "prompt": "x", name: value}).status_code)
            for ids in (prefill_fault, decode_fault):
                body = {"model": MODEL, "prompt": ids, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
                r = h.post("/v1/completions", json=body)
                codes.append((r.status_code, r.json()["error"]["code"], r.json()["error"]["message"]))
        with pytest.raises(RuntimeError, match="OverflowError"):
            engine.submit([3, 4, 5], SamplingParams(max_new_tokens=4, temperature=1.0, top_k=10**12)).result()
        return codes

    with ThreadPoolExecutor(len(prompts) + 1) as pool:
        streams = [pool.submit(stream, p) for p in prompts]
        codes = pool.submit(barrage).result()
        assert [f.result() for f in streams] == normal
    assert codes[: len(OUT_OF_RANGE)] == [400] * len(OUT_OF_RANGE)
    assert codes[-2] == (503, "generation_failed", "generation failed: RuntimeError: injected prefill fault")
    assert codes[-1] == (503, "generation_failed", "generation failed: RuntimeError: injected decode fault")
    assert [complete(p) for p in prompts] == normal  # and the engine serves on
    _wait_idle(engine)


RAW_BAD_BODIES = [
    # (raw body, error param): lone surrogates, nesting, non-standard constants, huge integers, not UTF-8
    (b'{"model": "tiny", "prompt": "ROMEO \\ud800"}', "prompt"),
    (b'{"model": "tiny", "prompt": ["ok", "\\udfff x"]}', "prompt[1]"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    (
        b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udbff"}]}]}',
        "messages[0].content[0].text",
    ),
    (b"[" * 100_000 + b"]" * 100_000, None),
    (b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', None),
    (b'{"model": "tiny", "prompt": "x", "seed": ' + b"9" * 5000 + b"}", None),
    (b'{"model": "tiny", "prompt": "\xff\xfe"}', None),
]


def test_surrogates_nesting_and_bad_json_are_400(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=server["base"], timeout=30, headers=headers) as h:
        for raw, param in RAW_BAD_BODIES:
            path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
            r = h.post(path, content=raw)
            assert r.status_code == 400, (raw[:80], r.status_code, r.text[:300])
            assert r.json()["error"]["param"] == param, (raw[:80], r.json())
        # a surrogate *pair* is an ordinary character
        r = h.post("/v1/completions", content=b'{"model": "tiny", "prompt": "a \\ud83d\\ude00", "max_tokens": 2}')
        assert r.status_code == 200, r.text


def test_body_size_limit_is_413_before_parsing(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    big = b'{"model": "tiny", "prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    with httpx.Client(base_url=server["base"], timeout=60, headers=headers) as h:
        r = h.post("/v1/completions", content=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit holds while reading
            for i in range(0, len(big), 1 << 16):
                yield big[i : i + (1 << 16)]

        r = h.post("/v1/completions", content=chunks())
        assert r.status_code == 413


def test_overlong_prompt_is_refused_without_tokenising(server, monkeypatch):
    tok = server["tok"]
    seen = []
    encode = tok.encode

    def spy(text, *a, **kw):
        seen.append(len(text))
        return encode(text, *a, **kw)

    monkeypatch.setattr(tok, "encode", spy)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    prompt = "Once upon a time " * 60_000  # ~1 MB, far past a 64-token context
    with httpx.Client(base_url=server["base"], timeout=60, headers=headers) as h:
        r = h.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        chat = {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}
        r = h.post("/v1/chat/completions", json=chat)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert all(n < 100_000 for n in seen), seen


def test_browser_safety(server):
    engine, key = server["engine"], {"Authorization": f"Bearer {API_KEY}"}
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
    before = engine.tokens_generated
    with httpx.Client(base_url=server["base"], timeout=30) as h:
        # A cross-origin "simple" POST (text/plain needs no preflight) is not executed.
        for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {**key, **({"Content-Type": ctype} if ctype else {})}
            r = h.post("/v1/completions", content=body, headers={**headers, "Origin": "http://evil.example"})
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
            assert "access-control-allow-origin" not in r.headers
        assert engine.tokens_generated == before
        r = h.post("/v1/completions", content=body, headers={**key, "Content-Type": "application/json; charset=utf-8"})
        assert r.status_code == 200
        # With a key: the schema needs it, and /health tells a stranger only that it is alive.
        assert h.get("/openapi.json").status_code == 401
        assert h.get("/openapi.json", headers=key).status_code == 200
        assert h.get("/health").json() == {"status": "ok"}
        assert h.get("/health", headers=key).json()["model"] == MODEL

    # Opt-in CORS and allowed hosts, through a second app over the same engine (no key).
    app = create_app(engine, server["tok"], MODEL, cors_origins=("http://good.example",), allowed_hosts=("127.0.0.1",))
    base, stop = _run_app(app)
    try:
        with httpx.Client(base_url=base, timeout=30) as h:
            pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
            r = h.options("/v1/completions", headers={**pre, "Origin": "http://good.example"})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://good.example"
            r = h.options("/v1/completions", headers={**pre, "Origin": "http://evil.example"})
            assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
            r = h.post(
                "/v1/completions",
                content=body,
                headers={"Content-Type": "application/json", "Origin": "http://good.example"},
            )
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://good.example"
            assert h.get("/health", headers={"Host": "rebound.example"}).status_code == 400
            assert h.get("/health").json()["model"] == MODEL  # no key configured: nothing to hide
    finally:
        stop()


def test_broken_chat_template_is_400_without_server_paths(server, monkeypatch):
    tok = server["tok"]
    monkeypatch.setattr(tok, "chat_template", "{{ raise_exception('no such role here') }}")
    monkeypatch.setattr(tok, "_compiled_template", None)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(server["base"] + "/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "no such role here" in message and str(tok.path) not in message


def test_queue_full_is_429(checkpoint):
    cfg, params = load_hf(checkpoint)
    tok = load_tokenizer(checkpoint)
    engine = Engine(params, cfg, tok, max_batch=1, max_seq_len=MAX_SEQ, max_queue=2)  # never started
    engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2))
    engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2))
    with pytest.raises(QueueFull):
        engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2))
    from starlette.testclient import TestClient

    with TestClient(create_app(engine, tok, MODEL)) as tc:
        r = tc.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"


def test_chat_cli_with_piped_stdin(checkpoint):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "smedjan.cli",
            "chat",
            str(checkpoint),
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
            "--max-seq-len",
            "128",
        ],
        input="Hello there!\nHow are you?\n/exit\nnever read\n",
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant: ") == 2


def test_serve_cli_browser_flags(checkpoint):
    """`smedjan serve` wires --cors-origin, --allowed-host, --api-key and --max-body-bytes through."""
    port = _free_port()
    cmd = [sys.executable, "-m", "smedjan", "serve", str(checkpoint), "--port", str(port), "--no-warmup"]
    cmd += ["--max-seq-len", str(MAX_SEQ), "--api-key", API_KEY, "--max-body-bytes", "2048"]
    cmd += ["--cors-origin", "http://good.example", "--allowed-host", "127.0.0.1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    base, key = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {API_KEY}"}
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        with httpx.Client(base_url=base, timeout=30) as h:
            assert h.get("/health").json() == {"status": "ok"}
            assert h.get("/health", headers={"Host": "evil.example"}).status_code == 400
            assert h.get("/openapi.json").status_code == 401
            pre = {"Origin": "http://good.example", "Access-Control-Request-Method": "POST"}
            assert h.options("/v1/completions", headers=pre).headers["access-control-allow-origin"] == pre["Origin"]
            r = h.post("/v1/completions", content=b"x" * 4096, headers={**key, "Content-Type": "application/json"})
            assert r.status_code == 413
            r = h.post("/v1/completions", content=b"{}", headers={**key, "Content-Type": "text/plain"})
            assert r.status_code == 415
    finally:
        proc.terminate()
        proc.wait(30)


def test_decode_chunks_equal_single_steps(checkpoint):
    """Several decode steps per dispatch (the default) give exactly the tokens, finish reasons and
    stops of one step per dispatch, for requests that end inside a chunk (length or stop token)."""
    cfg, params = load_hf(checkpoint)
    prompts = [[1, 5, 9, 2], [3, 3, 7], [11, 4, 6, 8, 10], [2]]

    def run(chunk, stop_for=None):
        with Engine(
            params, cfg, None, max_batch=4, max_seq_len=MAX_SEQ, min_kv_bucket=MAX_SEQ, decode_chunk=chunk
        ) as engine:
            reqs = [
                engine.submit(
                    p,
                    SamplingParams(
                        max_new_tokens=n, ignore_eos=True, stop_token_ids=[] if stop_for is None else [stop_for[i]]
                    ),
                )
                for i, (p, n) in enumerate(zip(prompts, [1, 3, 9, 17]))
            ]
            out = [r.result() for r in reqs]
            assert engine.num_active == 0
        return [(ids, reason) for ids, _, reason in out]

    single = run(1)
    assert [len(ids) for ids, _ in single] == [1, 3, 9, 17]
    assert run(8) == single
    stops = [ids[min(2, len(ids) - 1)] for ids, _ in single]  # a token each request will meet
    single_stop = run(1, stops)
    assert any(reason == "stop" for _, reason in single_stop)
    assert run(8, stops) == single_stop

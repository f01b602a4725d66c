"""OpenAI request parsing and validation, by hand: every problem becomes an APIError with the
offending parameter named, never a 500. No FastAPI/pydantic needed here.

Every value that reaches the engine is range-checked here, so one request's bad value never
reaches the batched device step that other requests share (a top_k past int32 used to overflow
inside the engine and fail everyone in flight)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

from smedjan.infer.sampling import MAX_TOP_LOGPROBS, SamplingParams

MAX_JSON_DEPTH = 32  # real requests nest 4 deep; json.loads recurses, so depth is checked first
INT32_MAX = 2**31 - 1
MAX_STOP = 16
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {
            400: "invalid_request_error",
            401: "invalid_request_error",
            404: "invalid_request_error",
            413: "invalid_request_error",
            415: "invalid_request_error",
            429: "rate_limit_error",
        }.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None):
    raise APIError(400, message, param, code or "invalid_value")


_ESCAPE = re.compile(rb"\\.", re.S)
_STRING = re.compile(rb'"[^"]*"')
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays/objects in a UTF-8 JSON text, without recursion: escapes and
    strings are cut out by regex, then brackets are counted with numpy (C speed for megabytes)."""
    text = _STRING.sub(b'""', _ESCAPE.sub(b"", raw))
    a = np.frombuffer(text, np.uint8)
    opens = (a == ord("[")) | (a == ord("{"))
    closes = (a == ord("]")) | (a == ord("}"))
    return int(np.cumsum(opens.astype(np.int32) - closes).max(initial=0))


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"The request body is not UTF-8 ({e}).", None, "invalid_json") from None
    if json_depth(raw) > MAX_JSON_DEPTH:
        bad(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.", None, "invalid_json")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, NaN/Infinity, integers of >4300 digits
        raise APIError(400, f"We could not parse the JSON body of your request ({e}).", None, "invalid_json") from None
    if not isinstance(body, dict):
        bad("The request body must be a JSON object.", None, "invalid_json")
    if _SURROGATE_ESCAPE.search(raw):  # only escapes can carry one: raw UTF-8 cannot encode a surrogate
        _check_surrogates(body)
    return body


def _check_surrogates(body: dict) -> None:
    """A lone surrogate (\\ud800 with no partner) is valid JSON but not Unicode: no tokenizer takes it."""
    stack = [(body, "")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                bad(f"'{path}' contains a lone surrogate (\\ud800-\\udfff): not valid Unicode text", path)
        elif isinstance(v, dict):
            for k, x in v.items():
                if _SURROGATE.search(k):
                    bad(f"a key in '{path or 'body'}' contains a lone surrogate: not valid Unicode text", path or None)
                stack.append((x, f"{path}.{k}" if path else k))
        elif isinstance(v, list) and any(isinstance(x, (str, list, dict)) for x in v):
            stack.extend((x, f"{path}[{i}]") for i, x in enumerate(v))


def _num(body, name, lo, hi, default, *, integer=False, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {v!r}", name, "invalid_type")
    if v != v or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        bad(f"'{name}' must be in {rng}, got {v!r}", name)
    return v


def _bool(body, name, default=False):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        bad(f"'{name}' must be a boolean, got {v!r}", name, "invalid_type")
    return v


def _stop(body) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or len(v) > MAX_STOP:
        bad(f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop", "invalid_type")
    if any(len(s) > MAX_STOP_CHARS for s in v):
        bad(f"each 'stop' string must be at most {MAX_STOP_CHARS} characters", "stop")
    return tuple(s for s in v if s)


def _int_list(body, name, limit) -> tuple[int, ...]:
    v = body.get(name) or []
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        bad(f"'{name}' must be a list of integers", name, "invalid_type")
    if len(v) > limit or any(not 0 <= t <= INT32_MAX for t in v):
        bad(f"'{name}' must hold at most {limit} token ids, each in [0, {INT32_MAX}]", name)
    return tuple(v)


def _logit_bias(body) -> None:
    """Checked for shape and range first (a malformed map is the client's bug to hear about), then
    refused: the sampler has no per-token bias."""
    v = body.get("logit_bias")
    if v is None or v == {}:
        return
    if not isinstance(v, dict) or len(v) > MAX_LOGIT_BIAS:
        bad(f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} entries", "logit_bias", "invalid_type")
    for k, b in v.items():
        if not (k.isascii() and k.isdigit() and int(k) <= INT32_MAX):
            bad(f"'logit_bias' keys must be token ids (decimal strings), got {k!r}", "logit_bias")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            bad(f"'logit_bias' values must be numbers in [-100, 100], got {b!r} for {k}", "logit_bias")
    bad("'logit_bias' is not supported by this server", "logit_bias", "unsupported_parameter")


@dataclass
class GenRequest:
    """A parsed completions or chat request."""

    model: str
    prompts: list  # list of str or list[int] (completions) / one rendered chat prompt
    params: SamplingParams
    max_tokens: int | None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # completions: number of top logprobs; chat: None/0/1+
    chat: bool = False
    messages: list = field(default_factory=list)


def _common(body, chat: bool) -> tuple[dict, GenRequest]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        bad("you must provide a model parameter", "model", "invalid_type")
    for unsupported in (
        "suffix",
        "tools",
        "functions",
        "tool_choice",
        "function_call",
        "audio",
        "modalities",
        "prediction",
    ):
        if body.get(unsupported) not in (None, [], {}, "none", "auto"):
            bad(f"'{unsupported}' is not supported by this server", unsupported, "unsupported_parameter")
    _logit_bias(body)
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        bad("only response_format {'type': 'text'} is supported", "response_format", "unsupported_parameter")
    max_tokens = _num(
        body,
        "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
        1,
        INT32_MAX,
        None,
        integer=True,
    )
    if max_tokens is None and not chat:
        max_tokens = 16
    n = _num(body, "n", 1, 16, 1, integer=True)
    best_of = body.get("best_of")
    if best_of is not None and (isinstance(best_of, bool) or best_of != n):
        bad("'best_of' other than n is not supported", "best_of", "unsupported_parameter")
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _bool(so or {}, "include_usage")
    seed = _num(body, "seed", -(2**63), 2**64 - 1, None, integer=True)
    top_k = _num(body, "top_k", -1, INT32_MAX, 0, integer=True)  # past the vocab it means "off"
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        bad("'user' must be a string", "user", "invalid_type")
    params = dict(
        max_new_tokens=max_tokens or 1,
        temperature=float(_num(body, "temperature", 0.0, 2.0, 1.0)),
        top_p=float(_num(body, "top_p", 0.0, 1.0, 1.0, lo_open=True)),
        top_k=int(top_k),
        min_p=float(_num(body, "min_p", 0.0, 1.0, 0.0)),
        repetition_penalty=float(_num(body, "repetition_penalty", 0.0, 10.0, 1.0, lo_open=True)),
        presence_penalty=float(_num(body, "presence_penalty", -2.0, 2.0, 0.0)),
        frequency_penalty=float(_num(body, "frequency_penalty", -2.0, 2.0, 0.0)),
        seed=seed,
        stop=_stop(body),
        stop_token_ids=_int_list(body, "stop_token_ids", MAX_STOP_TOKEN_IDS),
        ignore_eos=_bool(body, "ignore_eos"),
        speculative=_bool(body, "speculative"),  # extension: prompt-lookup speculative decoding
    )
    req = GenRequest(
        model=model,
        prompts=[],
        params=None,
        max_tokens=max_tokens,
        n=n,
        stream=stream,
        include_usage=include_usage,
        chat=chat,
    )
    return params, req


def parse_completion(body: dict) -> GenRequest:
    params, req = _common(body, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, list) and p for p in prompt)
        and all(isinstance(t, int) and not isinstance(t, bool) for p in prompt for t in p)
    ):
        prompts = [list(p) for p in prompt]
    else:
        bad(
            "'prompt' must be a non-empty string, list of strings, list of token ids or list of such lists",
            "prompt",
            "invalid_type",
        )
    if len(prompts) * req.n > 64:
        bad("at most 64 completions (prompts × n) per request", "n")
    if any(p == "" for p in prompts):
        bad("'prompt' must not be empty", "prompt")
    lp = body.get("logprobs")
    if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 5):
        bad(f"'logprobs' must be an integer in [0, 5], got {lp!r}", "logprobs")
    req.logprobs = lp
    req.echo = _bool(body, "echo")
    if req.echo and req.stream:
        bad("'echo' together with 'stream' is not supported", "echo", "unsupported_parameter")
    req.prompts = prompts
    req.params = _sampling(params, logprobs=lp is not None, top=lp or 0)
    return req


ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_chat(body: dict) -> GenRequest:
    params, req = _common(body, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        bad("'messages' must be a non-empty list", "messages", "invalid_type")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            bad(
                f"messages[{i}] must be an object with 'role' one of {list(ROLES)}",
                f"messages[{i}].role",
                "invalid_type",
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    bad(
                        f"messages[{i}].content: only text parts are supported",
                        f"messages[{i}].content",
                        "unsupported_parameter",
                    )
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            bad(
                f"messages[{i}].content must be a string or a list of text parts",
                f"messages[{i}].content",
                "invalid_type",
            )
        clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    lp = _bool(body, "logprobs")
    top = _num(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0, integer=True)
    if top and not lp:
        bad("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    req.logprobs = top if lp else None
    req.messages = clean
    req.params = _sampling(params, logprobs=lp, top=top)
    return req


def _sampling(params: dict, logprobs: bool, top: int) -> SamplingParams:
    sp = SamplingParams(**params, logprobs=logprobs, top_logprobs=top)
    try:
        return sp.validate()
    except ValueError as e:
        param, msg = e.args if len(e.args) == 2 else (None, str(e))
        bad(msg, param)

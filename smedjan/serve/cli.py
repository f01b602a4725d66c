"""`smedjan serve` (OpenAI-compatible HTTP server) and `smedjan chat` (terminal chat)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from smedjan.errors import UserError


def _load(args):
    from smedjan.checkpoint import CheckpointError
    from smedjan.infer.cli import default_dtype, load_model, stop_ids_for

    try:
        folder, cfg, params, tok = load_model(args.model, dtype=default_dtype(args.dtype))
    except (CheckpointError, FileNotFoundError, OSError) as e:
        raise UserError(str(e)) from None
    tok.compile_chat_template()  # a template that does not parse is refused now, not at every request
    if tok.vocab_size > cfg.vocab_size:
        print(f"warning: tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size}", file=sys.stderr)
    max_seq_len = args.max_seq_len or cfg.max_position_embeddings
    if max_seq_len < 2:
        raise UserError("--max-seq-len must be at least 2")
    return folder, cfg, params, tok, max_seq_len, stop_ids_for(folder, cfg, tok)


def _engine(args, cfg, params, tok, max_seq_len, stops, max_batch):
    from smedjan.infer.cli import default_dtype, load_adapters
    from smedjan.serve.engine import Engine

    return Engine(
        params,
        cfg,
        tok,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        max_queue=args.max_queue,
        attn_impl=args.attn_impl,
        stop_token_ids=stops,
        decode_chunk=args.decode_chunk,
        adapters=load_adapters(getattr(args, "lora", None), cfg, default_dtype(args.dtype)),
    )


def _warmup(engine, tok):
    """Compile the prefill and decode steps for short prompts before the first request."""
    from smedjan.infer.sampling import SamplingParams

    t = time.perf_counter()
    ids = tok.encode_prompt("Hello") or [0]
    engine.submit(ids, SamplingParams(max_new_tokens=2, ignore_eos=True)).result()
    return time.perf_counter() - t


def check_port(host: str, port: int) -> None:
    """UserError unless `host:port` can be listened on now (range, permission, already in use)."""
    import socket

    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: a TCP port is between 0 and 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what uvicorn sets: TIME_WAIT is no conflict
        try:
            s.bind(addr)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None


GENERIC_FOLDER_NAMES = {"hf", "model", "models", "final", "output", "checkpoint", "export", "snapshots"}


def served_model_name(model: str, folder: Path) -> str:
    """The model id clients see: a hub id as given; for a folder, config.json's `_name_or_path` when it
    names something, else the folder's name, or its parent's for generic names (a run's `RUN/hf` -> RUN)."""
    import json

    if not Path(model).exists():
        return str(model)  # fetched from the hub: its repo id
    try:
        named = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        named = None
    if isinstance(named, str) and named.strip() and not Path(named).is_absolute():
        return named
    path = Path(model).resolve()
    if path.name.lower() in GENERIC_FOLDER_NAMES and path.parent.name:
        return f"{path.parent.name}"
    return path.name


def _cmd_serve(args):
    from smedjan.infer.cli import check_sampling_args

    check_sampling_args(args)
    try:
        import uvicorn

        from smedjan.serve.app import create_app
    except ImportError as e:
        raise UserError(f"serving needs fastapi and uvicorn ({e})") from None
    if args.max_batch < 1:
        raise UserError("--max-batch must be at least 1")
    if args.max_body_bytes < 1024:
        raise UserError("--max-body-bytes must be at least 1024")
    check_port(args.host, args.port)  # before minutes of loading and compiling, not after
    folder, cfg, params, tok, max_seq_len, stops = _load(args)
    engine = _engine(args, cfg, params, tok, max_seq_len, stops, args.max_batch).start()
    name = args.model_name or served_model_name(args.model, folder)
    if not args.no_warmup:
        print("compiling... ", end="", file=sys.stderr, flush=True)
        print(f"{_warmup(engine, tok):.1f}s", file=sys.stderr)
    app = create_app(
        engine,
        tok,
        name,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        cors_origins=tuple(args.cors_origin or ()),
        allowed_hosts=tuple(args.allowed_host or ()),
    )
    print(
        f"serving {name} on http://{args.host}:{args.port}/v1 (max batch {args.max_batch}, context {max_seq_len})",
        file=sys.stderr,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()
    return 0


def _cmd_chat(args):
    from smedjan.infer.cli import check_sampling_args
    from smedjan.infer.sampling import SamplingParams

    check_sampling_args(args)
    folder, cfg, params, tok, max_seq_len, stops = _load(args)
    engine = _engine(args, cfg, params, tok, max_seq_len, stops, 1).start()
    interactive = sys.stdin.isatty()
    history = [{"role": "system", "content": args.system}] if args.system else []
    out = sys.stdout
    if interactive:
        print("smedjan chat: /exit to quit, /reset to clear the conversation", file=sys.stderr)
    try:
        while True:
            if interactive:
                out.write("> ")
                out.flush()
            line = sys.stdin.readline()
            if not line:  # EOF
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.strip() in ("/exit", "/quit"):
                break
            if line.strip() == "/reset":
                history = history[:1] if args.system else []
                continue
            history.append({"role": "user", "content": line})
            ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True), add_bos=False)
            start = 1 if history[0]["role"] == "system" else 0
            while len(ids) >= max_seq_len and len(history) - start > 2:  # forget the oldest exchange
                del history[start : start + 2]
                ids = tok.encode(tok.apply_chat_template(history, add_generation_prompt=True), add_bos=False)
            if len(ids) >= max_seq_len:
                print("(message too long for the context; try /reset)", file=sys.stderr)
                history.pop()
                continue
            params = SamplingParams(
                max_new_tokens=min(args.max_new_tokens, max_seq_len - len(ids)),
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                min_p=args.min_p,
                repetition_penalty=args.repetition_penalty,
                seed=args.seed,
            )
            if not interactive:
                out.write("assistant: ")
            reply = []
            req = engine.submit(ids, params)
            try:
                for ev in req:
                    if ev.error:
                        print(f"\n(error: {ev.error})", file=sys.stderr)
                        break
                    reply.append(ev.text)
                    out.write(ev.text)
                    out.flush()
            except KeyboardInterrupt:
                req.cancel()
            out.write("\n")
            out.flush()
            history.append({"role": "assistant", "content": "".join(reply)})
    finally:
        engine.shutdown()
    return 0


def _common_args(p):
    from smedjan.infer.cli import add_sampling_args

    p.add_argument("model", help="checkpoint folder or hub repo id")
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="KV cache length per sequence (default: the model's max_position_embeddings)",
    )
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429s")
    p.add_argument(
        "--attn-impl",
        default="auto",
        choices=["auto", "xla", "pallas", "pallas_fused"],
        help="decode attention: auto (the fused Pallas decode kernel on GPU, XLA elsewhere), xla, "
        "pallas (split-K kernel) or pallas_fused",
    )
    p.add_argument(
        "--decode-chunk",
        type=int,
        default=8,
        help="decode steps per dispatch (tokens then stream in bursts of up to this many)",
    )
    add_sampling_args(p)


def register(subparsers):
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with continuous batching",
        description="Serve a checkpoint over /v1/completions and /v1/chat/completions.",
    )
    _common_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=64, help="concurrent sequences (KV cache slots)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="larger request bodies get 413 before they are parsed",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="let browser pages from this origin call the API, e.g. http://localhost:3000 (repeatable; default: none)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        metavar="HOST",
        help="answer only requests whose Host header is this (repeatable; '*.example.com' allowed; default: any)",
    )
    p.add_argument(
        "--served-model-name",
        "--model-name",
        dest="model_name",
        default=None,
        help="model id clients use (default: a hub id as given; config.json's _name_or_path; the folder's "
        "name, or the run's name for RUN/hf)",
    )
    p.add_argument(
        "--lora",
        action="append",
        metavar="NAME=FOLDER",
        help="serve a LoRA adapter (PEFT folder) beside the base, unmerged; requests pick it by model=NAME "
        "and share the batch with the base and other adapters (repeatable)",
    )
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=_cmd_serve)

    c = subparsers.add_parser("chat", help="interactive chat in the terminal (streams; stdin may be piped)")
    _common_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(func=_cmd_chat, temperature=0.7, max_new_tokens=256)

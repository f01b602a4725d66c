"""`smedjan bench`: forward, decode and training throughput of the real code paths.

Columns (each: tokens/s, ms per step, TFLOP/s, MFU, peak device memory):

* forward  -- `forward()` on [batch, seq_len] fresh random tokens, bf16 weights, logits out.
* decode   -- batch 1, greedy, through the decode engine `smedjan.infer`: the prompt
              (seq_len - decode_tokens tokens) is prefilled first (not timed), then
              `decode_loop` (the on-device loop `smedjan generate` runs) makes decode_tokens
              tokens; also reported: one jitted `decode_step` per token (the server's path).
* train    -- the trainer's own `make_train_step` (fp32 master weights, bf16 compute, AdamW),
              i.e. exactly what `smedjan train` runs; fwd + bwd + optimizer update.

FLOPs (documented in benchmarks/RESULTS.md):
* train:   cfg.flops_per_token(S) = 6·N + 6·L·H·hd·S per token, N = matmul parameters
           (embedding lookup excluded, LM head included), attention = QK^T and PV,
           forward+backward (x3), causal (/2).
* forward: one third of that (2·N + 2·L·H·hd·S).
* decode:  2·N + 4·L·H·hd·ctx per token, ctx = mean attended context length.
MFU = FLOP/s / the device's dense bf16 peak (smedjan.hardware.PEAK_FLOPS); other devices: "n/a".

Timing: warm-up calls first (compile excluded), then `repeats` chunks of `iters` calls
dispatched back to back with one `block_until_ready` per chunk; the median chunk gives
the per-step time. Inputs are drawn from a pool of distinct random batches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from smedjan.errors import UserError
from smedjan.hardware import peak_flops_for

FLOP_FORMULA = (
    "train: 6*N + 6*L*H*hd*S per token (N = matmul params incl. LM head, excl. embedding lookup; "
    "attention QK^T+PV fwd+bwd, causal /2); forward: 1/3 of train; decode: 2*N + 4*L*H*hd*ctx; "
    "MFU = FLOP/s / dense bf16 peak (smedjan.hardware.PEAK_FLOPS: 989e12 for H100/H200)"
)
COLUMNS = ("forward", "decode", "train")


# ---- helpers -----------------------------------------------------------------------------------
def _peak_mem(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without stats raise various errors
        return None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def _timed(run_chunk, iters: int, repeats: int, warmup: int):
    """run_chunk(n) dispatches n steps and returns something to block on."""
    import jax

    if warmup:
        jax.block_until_ready(run_chunk(warmup))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run_chunk(iters))
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times), times


def _column(tokens_per_step, step_s, flops_per_token, peak, times, mem, **extra):
    tps = tokens_per_step / step_s
    flops = tps * flops_per_token
    return {
        "tokens_per_s": tps,
        "step_ms": step_s * 1e3,
        "tflops": flops / 1e12,
        "mfu": (flops / peak) if peak else None,
        "peak_mem_bytes": mem,
        "times_s": times,
        **extra,
    }


def _dtype(name: str):
    import jax.numpy as jnp

    return {
        "bf16": jnp.bfloat16,
        "bfloat16": jnp.bfloat16,
        "fp32": jnp.float32,
        "float32": jnp.float32,
        "fp16": jnp.float16,
    }[name]


# ---- columns -----------------------------------------------------------------------------------
def bench_forward(cfg, batch, seq_len, *, attn, dtype, iters, repeats, warmup, peak, pool=4, seed=0):
    import jax
    import jax.numpy as jnp

    from smedjan.model.transformer import forward, init_params

    params = init_params(cfg, jax.random.PRNGKey(seed), dtype)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), pool)
    toks = [jax.random.randint(k, (batch, seq_len), 0, cfg.vocab_size, jnp.int32) for k in keys]
    fwd = jax.jit(partial(forward, cfg=cfg, attn_impl=attn, compute_dtype=dtype))

    def chunk(n):
        out = None
        for i in range(n):
            out = fwd(params, toks[i % pool])
        return out

    t, times = _timed(chunk, iters, repeats, warmup)
    mem = _peak_mem(jax.devices()[0])
    return _column(batch * seq_len, t, cfg.flops_per_token(seq_len) / 3, peak, times, mem)


def timed_decode_loop(runner, cfg, prompt: list[int], row: dict, n_new: int, kv_len: int):
    """Prefill `prompt` into slot 0 of a batch-1 `smedjan.infer.Runner` (untimed), then time the
    on-device decode loop that `smedjan generate` runs. Returns (seconds, tokens [1, n_new])."""
    import jax
    import numpy as np

    from smedjan.infer.sampling import sampling_mode

    first = runner.prefill([0], [prompt], [row])
    jax.block_until_ready((first, runner.state))
    t0 = time.perf_counter()
    toks, *_ = runner.loop(first, np.ones(1, bool), [-1], n_new, kv_len, sampling=sampling_mode([row]))
    toks = jax.block_until_ready(toks)
    return time.perf_counter() - t0, toks


def bench_decode(cfg, seq_len, *, attn, dtype, repeats, warmup, peak, decode_tokens=None, seed=0):
    """Batch-1 greedy decoding through the engine (`smedjan.infer`), prompt prefilled first.

    Main number: `decode_loop`, the on-device loop `smedjan generate` runs (one dispatch for all
    tokens). `per_step_tokens_per_s`: one jitted `decode_step` call per token through
    `Runner.step`, the path the server's continuous-batching scheduler drives.
    """
    import jax
    import numpy as np

    from smedjan.infer import runner as gen
    from smedjan.infer.sampling import SamplingParams
    from smedjan.model.transformer import init_params

    n_new = decode_tokens or max(2, seq_len // 2)
    prompt_len = max(1, seq_len - n_new)
    total = prompt_len + n_new + 1
    max_len = gen.next_bucket(total, minimum=64)
    params = init_params(cfg, jax.random.PRNGKey(seed), dtype)
    runner = gen.Runner(params, cfg, 1, max_len, dtype=dtype, attn_impl=attn)
    del params
    rng = np.random.default_rng(seed + 2)
    row = SamplingParams(max_new_tokens=n_new, temperature=0.0).row(0)
    kv_len = gen.next_bucket(total, max_len)

    def prompt():
        return rng.integers(0, cfg.vocab_size, prompt_len).tolist()

    def loop_once():
        return timed_decode_loop(runner, cfg, prompt(), row, n_new, kv_len)[0] / n_new

    def steps_once():
        jax.block_until_ready((runner.prefill([0], [prompt()], [row]), runner.state))
        act = np.ones((1,), bool)
        t0 = time.perf_counter()
        out = None
        for _ in range(n_new):
            out = runner.step(act)
        jax.block_until_ready((out, runner.state))
        return (time.perf_counter() - t0) / n_new

    if warmup:  # compiles prefill, decode_loop and every kv_len bucket of decode_step
        loop_once()
        steps_once()
    times = [loop_once() for _ in range(repeats)]
    step_times = [steps_once() for _ in range(repeats)]
    t = statistics.median(times)
    mem = _peak_mem(jax.devices()[0])
    n = cfg.matmul_params()
    ctx = prompt_len + n_new / 2
    fpt = 2 * n + 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * ctx
    impl = runner.attn_impl
    return _column(
        1,
        t,
        fpt,
        peak,
        times,
        mem,
        prompt_len=prompt_len,
        decode_tokens=n_new,
        path=f"smedjan.infer.runner.decode_loop (on-device loop, greedy, attn {impl})",
        per_step_tokens_per_s=1.0 / statistics.median(step_times),
        per_step_times_s=step_times,
    )


def bench_train(
    cfg,
    batch,
    seq_len,
    *,
    attn,
    remat,
    dtype,
    iters,
    repeats,
    warmup,
    peak,
    loss_chunk=None,
    grad_accum=1,
    pool=4,
    seed=0,
):
    import jax
    import jax.numpy as jnp

    from smedjan.runconfig import OptimConfig
    from smedjan.train.step import init_train_state, make_optimizer, make_train_step

    optimizer = make_optimizer(OptimConfig())  # the trainer's defaults: AdamW, cosine
    state = init_train_state(cfg, jax.random.PRNGKey(seed), optimizer, param_dtype=jnp.float32)
    step = make_train_step(
        cfg,
        optimizer,
        attn_impl=attn,
        remat=remat,
        compute_dtype=dtype,
        grad_accum=grad_accum,
        loss_chunk=loss_chunk,
        mesh=None,
    )
    keys = jax.random.split(jax.random.PRNGKey(seed + 3), pool)
    # the trainer's batch format: {"tokens": int32 [B, S+1]} (inputs/targets are its shifts)
    batches = [{"tokens": jax.random.randint(k, (batch, seq_len + 1), 0, cfg.vocab_size, jnp.int32)} for k in keys]
    holder = {"state": state}

    def chunk(n):
        st, metrics = holder["state"], None
        for i in range(n):
            st, metrics = step(st, batches[i % pool])
        holder["state"] = st
        return metrics

    t, times = _timed(chunk, iters, repeats, warmup)
    mem = _peak_mem(jax.devices()[0])
    return _column(batch * seq_len, t, cfg.flops_per_token(seq_len), peak, times, mem)


# ---- peer --------------------------------------------------------------------------------------
def run_torch_peer(cfg, args) -> dict:
    """Runs benchmarks/torch_peer.py in a child process (before JAX touches the GPU)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "torch_peer.py"
    if not script.is_file():
        return {"error": f"{script} not found (peer needs a source checkout)"}
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return {"error": f"torch/transformers not importable: {e}"}
    modes = args.peer_modes
    cmd = [
        sys.executable,
        str(script),
        "--config-json",
        json.dumps(cfg.to_hf_dict()),
        "--batch",
        str(args.batch),
        "--seq-len",
        str(args.seq_len),
        "--iters",
        str(args.iters),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--modes",
        modes,
        "--columns",
        getattr(args, "peer_columns", None) or ",".join(args.columns),
    ]
    if args.decode_tokens:
        cmd += ["--decode-tokens", str(args.decode_tokens)]
    env = dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {
            "error": "torch peer failed: " + proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"torch peer exited {proc.returncode}"
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- command -----------------------------------------------------------------------------------
def run_bench(cfg, args) -> dict:
    import jax

    peer = run_torch_peer(cfg, args) if args.peer == "torch" else None  # before JAX takes the GPU
    from smedjan.backend import settings

    dev = jax.devices()[0]
    peak = peak_flops_for(dev.device_kind)
    attn = settings(attn_impl=args.attn).attn_impl
    dtype = _dtype(args.dtype)
    common = dict(dtype=dtype, repeats=args.repeats, warmup=args.warmup, peak=peak)
    results = {}
    for col in args.columns:
        log(args, f"[bench] {col} ...")
        try:
            if col == "forward":
                results[col] = bench_forward(cfg, args.batch, args.seq_len, attn=attn, iters=args.iters, **common)
            elif col == "decode":
                # the engine's own choice under --attn auto (smedjan.backend.settings)
                results[col] = bench_decode(
                    cfg,
                    args.seq_len,
                    attn=args.attn if args.attn == "auto" else attn,
                    decode_tokens=args.decode_tokens,
                    **common,
                )
            elif col == "train":
                results[col] = bench_train(
                    cfg,
                    args.batch,
                    args.seq_len,
                    attn=attn,
                    remat=args.remat,
                    iters=args.iters,
                    loss_chunk=args.loss_chunk,
                    grad_accum=args.grad_accum,
                    **common,
                )
        except Exception as e:  # noqa: BLE001 - an OOM in one column should not hide the others
            if not _is_oom(e):
                raise
            results[col] = {"error": f"out of memory: {str(e).splitlines()[0][:200]}"}
    from smedjan.train.step import speed_knobs

    remat, loss_chunk, scan_unroll = speed_knobs(cfg, args.remat, args.loss_chunk)  # what the step ran
    out = {
        "model": args.size,
        "config": cfg.to_hf_dict(),
        "num_params": cfg.num_params(),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "attn": attn,
        "remat": remat,
        "dtype": args.dtype,
        "loss_chunk": loss_chunk,
        "scan_unroll": scan_unroll,
        "grad_accum": args.grad_accum,
        "backend": jax.default_backend(),
        "device": dev.device_kind,
        "jax": jax.__version__,
        "peak_flops": peak,
        "flop_formula": FLOP_FORMULA,
        "iters": args.iters,
        "repeats": args.repeats,
        "results": results,
    }
    if peer is not None:
        out["peer"] = peer
        out["ratio"] = peer_ratios(results, peer)
    return out


def _is_oom(e: Exception) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "Out of memory" in s or "out of memory" in s


def peer_ratios(results: dict, peer: dict) -> dict:
    """smedjan tokens/s over each peer mode's tokens/s, per column."""
    ratios = {}
    for mode, cols in (peer.get("results") or {}).items():
        for col, r in cols.items():
            ours = results.get(col, {}).get("tokens_per_s")
            if ours and r.get("tokens_per_s"):
                ratios.setdefault(col, {})[mode] = ours / r["tokens_per_s"]
    return ratios


def _fmt_mem(b):
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def format_table(out: dict) -> str:
    lines = [
        f"smedjan bench: {out['model']} ({out['num_params'] / 1e6:.1f}M params)  batch {out['batch']} x seq "
        f"{out['seq_len']}  attn={out['attn']} remat={out['remat']} dtype={out['dtype']}  "
        f"device={out['device']} ({out['backend']}, jax {out['jax']})"
    ]
    head = f"{'column':<9} {'tokens/s':>12} {'ms/step':>10} {'TFLOP/s':>9} {'MFU':>7} {'peak mem':>11}"
    lines += [head, "-" * len(head)]
    for col, r in out["results"].items():
        if "error" in r:
            lines.append(f"{col:<9} {r['error']}")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"{col:<9} {r['tokens_per_s']:>12,.0f} {r['step_ms']:>10.3f} {r['tflops']:>9.2f} {mfu:>7} "
            f"{_fmt_mem(r['peak_mem_bytes']):>11}"
        )
    dec = out["results"].get("decode", {})
    if "per_step_tokens_per_s" in dec:
        lines.append(
            f"decode: {dec['decode_tokens']} tokens after a {dec['prompt_len']}-token prompt, batch 1, via "
            f"{dec['path']}; one dispatch per token (server path): {dec['per_step_tokens_per_s']:,.0f} tok/s"
        )
    if out["results"].get("forward") or out["results"].get("train"):
        lines.append("peak mem: process peak so far (columns run in order), from jax memory_stats")
    peer = out.get("peer")
    if peer is not None:
        if "error" in peer:
            lines.append(f"peer torch: {peer['error']}")
        else:
            lines.append(
                f"peer: torch {peer.get('torch')} + transformers {peer.get('transformers')} on "
                f"{peer.get('device')} ({peer.get('dtype')})"
            )
            for mode, cols in peer["results"].items():
                for col, r in cols.items():
                    ratio = out["ratio"].get(col, {}).get(mode)
                    rs = "" if ratio is None else f"   smedjan/peer = {ratio:.2f}x"
                    gc = "   (gradient checkpointing)" if r.get("grad_checkpointing") else ""
                    lines.append(
                        f"  {mode:<8} {col:<8} {r['tokens_per_s']:>12,.0f} tok/s {r['step_ms']:>9.3f} ms{rs}{gc}"
                    )
    lines.append(f"FLOPs: {out['flop_formula']}")
    return "\n".join(lines)


def log(args, msg):
    if not args.json or args.verbose:
        print(msg, file=sys.stderr, flush=True)


# (iters, repeats, warmup, decode tokens) when not given: accelerators get long chunks for stable medians;
# on CPU, where compiling dominates and a step takes milliseconds to seconds, a few steps and 16 decoded
# tokens give the table for `--size tiny` in under a minute on 2 cores (decode tokens None: seq_len / 2).
TIMING_DEFAULTS = {"cpu": (3, 3, 1, 16), "accelerator": (20, 5, 3, None)}


def run(args) -> int:
    import jax

    from smedjan.config import ConfigError, resolve_config
    from smedjan.info import model_overrides

    timing = TIMING_DEFAULTS["cpu" if jax.default_backend() == "cpu" else "accelerator"]
    for name, default in zip(("iters", "repeats", "warmup", "decode_tokens"), timing):
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("batch", "seq_len", "iters", "repeats"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        raise UserError("--warmup must be >= 0")
    cols = tuple(c.strip() for c in args.columns.split(",") if c.strip())
    bad = [c for c in cols if c not in COLUMNS]
    if bad or not cols:
        raise UserError(f"--columns takes a comma list of {COLUMNS}, got {args.columns!r}")
    args.columns = cols
    try:
        overrides = model_overrides(args)
        cfg = resolve_config(args.size, **overrides)
        if args.seq_len > cfg.max_position_embeddings:
            cfg = cfg.replace(max_position_embeddings=args.seq_len)
    except (ConfigError, TypeError) as e:
        raise UserError(str(e)) from None
    from smedjan.model.transformer import REMAT_POLICIES

    if args.remat != "auto" and args.remat not in REMAT_POLICIES:
        raise UserError(f"--remat must be one of {sorted(REMAT_POLICIES)}, got {args.remat!r}")
    if args.loss_chunk is not None and args.loss_chunk <= 0:
        raise UserError("--loss-chunk must be positive")
    if args.grad_accum < 1 or args.batch % args.grad_accum:
        raise UserError(f"--grad-accum must be >= 1 and divide --batch ({args.batch})")
    if "decode" in cols and args.decode_tokens and args.decode_tokens < 2:
        raise UserError("--decode-tokens must be >= 2")
    out = run_bench(cfg, args)
    print(json.dumps(out, indent=2) if args.json else format_table(out))
    return 0


def add_bench_args(p) -> None:
    from smedjan.info import add_model_args

    p.add_argument(
        "--size", default="small", help="preset (tiny, small, medium, 125m, 350m, 1b, ...) or checkpoint folder"
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--attn", default="auto", choices=["auto", "xla", "cudnn", "pallas"])
    p.add_argument(
        "--remat",
        default="auto",
        help="remat policy of the train step (auto = the trainer's default, none, full, dots)",
    )
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="compute dtype")
    p.add_argument("--loss-chunk", type=int, default=None, help="train step's cross-entropy chunk (tokens)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--columns", default=",".join(COLUMNS), help="comma list of forward,decode,train")
    p.add_argument("--iters", type=int, help="timed steps per repeat (default: 20 on accelerators, 3 on CPU)")
    p.add_argument("--repeats", type=int, help="repeats; the median is reported (default: 5, CPU 3)")
    p.add_argument("--warmup", type=int, help="untimed steps first, compile included (default: 3, CPU 1)")
    p.add_argument(
        "--decode-tokens", type=int, default=None, help="decoded tokens per repeat (default: seq_len/2; CPU 16)"
    )
    p.add_argument(
        "--peer",
        choices=["none", "torch"],
        default="none",
        help="also run PyTorch + transformers at the same shapes and print the ratio",
    )
    p.add_argument("--peer-modes", default="eager,compile", help="peer modes: eager,compile")
    p.add_argument("--peer-columns", default=None, help="peer columns (default: same as --columns)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--verbose", action="store_true")
    add_model_args(p)


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="forward / decode / train throughput, MFU and memory (optionally vs PyTorch)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_bench_args(p)
    p.set_defaults(func=run)

"""Many `smedjan bench` configurations in one process (one JAX start, one device lease).

Every entry is exactly a `smedjan bench` command line (printed with its result), run through
the same code (`smedjan.bench.run_bench`). Torch peers run first, each in its own child
process, before JAX takes the GPU. Results go to --out/results.jsonl as they finish; a
summary table is printed last. A wall-clock budget stops starting new entries.

    PYTHONPATH=. python benchmarks/train_speed.py --plan h100 --out $OUT --budget-s 300
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smedjan.bench import add_bench_args, format_table, peer_ratios, run_bench, run_torch_peer  # noqa: E402
from smedjan.config import resolve_config  # noqa: E402

# In priority order (the budget cuts from the end). "peer" entries run first regardless.
PLANS = {
    "h100": [
        "--size small --batch 4 --seq-len 128",
        "--size 125m --batch 16 --seq-len 1024 --attn cudnn --decode-tokens 128 --iters 10 --repeats 3 "
        "--peer torch --peer-columns train",
        "--size 1b --batch 16 --seq-len 1024 --attn cudnn --columns train --iters 6 --repeats 3 --warmup 2",
        "--size medium --batch 4 --seq-len 128",
        "--size 1b --batch 32 --seq-len 1024 --attn cudnn --remat dots --columns train --iters 4 --repeats 3 --warmup 2",
        "--size 125m --batch 16 --seq-len 1024 --attn pallas --columns train --iters 10 --repeats 3",
        "--size 125m --batch 16 --seq-len 1024 --attn cudnn --loss-chunk 4096 --columns train --iters 10 --repeats 3",
        "--size 125m --batch 16 --seq-len 1024 --attn xla --columns train --iters 10 --repeats 3",
    ],
    "h100-2": [
        "--size 125m --batch 16 --seq-len 1024 --attn pallas --columns train --iters 10 --repeats 3",
        "--size 1b --batch 32 --seq-len 1024 --attn cudnn --remat dots --columns train --iters 4 --repeats 3 --warmup 2",
    ],
    "h100-3": [  # remat and loss-chunk levers at 125m, same run
        "--size 125m --batch 16 --seq-len 1024 --attn cudnn --columns train --loss-chunk 16384 --iters 10 --repeats 3",
        "--size 125m --batch 16 --seq-len 1024 --attn cudnn --columns train --remat dots --iters 10 --repeats 3",
        "--size 125m --batch 16 --seq-len 1024 --attn cudnn --columns train --remat dots --loss-chunk 16384 "
        "--iters 10 --repeats 3",
        "--size 125m --batch 32 --seq-len 1024 --attn cudnn --columns train --remat dots --loss-chunk 16384 "
        "--iters 6 --repeats 3",
    ],
    "cpu-smoke": [
        "--size tiny --layers 2 --batch 2 --seq-len 16 --iters 2 --repeats 2 --warmup 1 --decode-tokens 4",
        "--size tiny --layers 2 --batch 2 --seq-len 16 --iters 2 --repeats 2 --warmup 1 --columns forward "
        "--peer torch --peer-modes eager",
    ],
}


def diag_train(size="125m", batch=16, seq_len=1024, attn="cudnn", iters=8, log=print) -> dict:
    """Where does the real step's time go? Times the trainer's own pieces separately (ms/step):
    forward+loss and its gradient per loss_chunk, the layer stack alone, the full-logits loss,
    and the optimizer update alone. Diagnostic only; the reported numbers use the real step."""
    import jax
    import jax.numpy as jnp
    import optax

    from smedjan.config import preset
    from smedjan.model.transformer import forward, init_params, lm_head
    from smedjan.runconfig import OptimConfig
    from smedjan.train import step as ts
    from smedjan.train.loss import naive_cross_entropy

    cfg = preset(size)
    bf16 = jnp.bfloat16
    params = init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
    toks = jax.random.randint(jax.random.PRNGKey(1), (batch, seq_len + 1), 0, cfg.vocab_size, jnp.int32)
    inputs, targets = toks[:, :-1], toks[:, 1:]

    def timeit(f, *a):
        jax.block_until_ready(f(*a))
        jax.block_until_ready(f(*a))
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = f(*a)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / iters * 1e3

    res = {}

    def rec(name, f, *a):
        try:
            res[name] = timeit(f, *a)
        except Exception as e:  # noqa: BLE001
            res[name] = f"error: {str(e).splitlines()[0][:120]}"
        log(f"[diag] {name}: {res[name]}")

    for chunk in (1024, 16384):

        def lf(p, chunk=chunk):
            return ts.loss_and_count(p, inputs, targets, cfg, attn_impl=attn, compute_dtype=bf16, loss_chunk=chunk)[0]

        rec(f"fwd+loss chunk={chunk}", jax.jit(lf), params)
        rec(f"grad chunk={chunk}", jax.jit(jax.grad(lf)), params)

    def body(p):
        h = forward(p, inputs, cfg, attn_impl=attn, compute_dtype=bf16, return_hidden=True)
        return jnp.sum(h.astype(jnp.float32))

    rec("fwd layers only", jax.jit(body), params)
    rec("grad layers only (no lm head / loss)", jax.jit(jax.grad(body)), params)

    def naive(p):
        h = forward(p, inputs, cfg, attn_impl=attn, compute_dtype=bf16, return_hidden=True)
        return naive_cross_entropy(h, lm_head(p, cfg), targets)[0]

    rec("grad full-logits CE", jax.jit(jax.grad(naive)), params)

    opt = ts.make_optimizer(OptimConfig())
    ost = opt.init(params)

    def upd(g, s, p):
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    rec("optimizer update (clip + AdamW)", jax.jit(upd), params, ost, params)
    return res


def parse_entry(line: str):
    p = argparse.ArgumentParser(prog="smedjan bench")
    add_bench_args(p)
    args = p.parse_args(shlex.split(line))
    args.columns = tuple(args.columns.split(","))
    args.json = True
    from smedjan.info import model_overrides

    cfg = resolve_config(args.size, **model_overrides(args))
    if args.seq_len > cfg.max_position_embeddings:
        cfg = cfg.replace(max_position_embeddings=args.seq_len)
    return cfg, args


def summary_row(line: str, out: dict) -> list[str]:
    rows = []
    for col, r in out.get("results", {}).items():
        if "error" in r:
            rows.append(f"{line[:90]:<90} {col:<8} ERROR {r['error'][:80]}")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "n/a" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**30:.1f}G"
        extra = ""
        if col == "decode" and "per_step_tokens_per_s" in r:
            extra = f" (per-step {r['per_step_tokens_per_s']:,.0f})"
        rows.append(f"{line[:90]:<90} {col:<8} {r['tokens_per_s']:>11,.0f} tok/s {mfu:>6} {mem:>6}{extra}")
    for col, modes in out.get("ratio", {}).items():
        for mode, ratio in modes.items():
            peer_tps = out["peer"]["results"][mode][col]["tokens_per_s"]
            rows.append(f"{'':<90} peer {mode:<7} {col:<6} {peer_tps:>11,.0f} tok/s  smedjan/peer {ratio:.2f}x")
    if out.get("peer", {}).get("error"):
        rows.append(f"{'':<90} peer ERROR {out['peer']['error'][:100]}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default="h100", choices=sorted(PLANS))
    ap.add_argument("--entries", default=None, help="comma list of entry indices to run (default all)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--diag", action="store_true", help="time the train step's pieces (125m 16x1024) first")
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no new entry after this many seconds")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    lines = PLANS[a.plan]
    if a.entries:
        lines = [lines[int(i)] for i in a.entries.split(",")]
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "results.jsonl"
    entries = [(line, *parse_entry(line)) for line in lines]

    peers = {}
    for line, cfg, args in entries:  # before JAX initialises the GPU
        if args.peer == "torch":
            t0 = time.perf_counter()
            print(f"[peer] smedjan bench {line}", file=sys.stderr, flush=True)
            peers[line] = run_torch_peer(cfg, args)
            print(
                f"[peer] done in {time.perf_counter() - t0:.0f}s: {json.dumps(peers[line])[:600]}",
                file=sys.stderr,
                flush=True,
            )

    summary = []
    if a.diag:
        res = diag_train(log=lambda m: print(m, file=sys.stderr, flush=True))
        with open(log_path, "a") as f:
            f.write(json.dumps({"diag": res}) + "\n")
        summary += [
            f"diag 125m 16x1024 cudnn: {k:<40} {v if isinstance(v, str) else f'{v:8.2f} ms'}" for k, v in res.items()
        ]
    for line, cfg, args in entries:
        elapsed = time.perf_counter() - t_start
        if elapsed > a.budget_s:
            summary.append(f"{line[:90]:<90} SKIPPED (budget: {elapsed:.0f}s elapsed)")
            continue
        t0 = time.perf_counter()
        print(f"[run] smedjan bench {line}", file=sys.stderr, flush=True)
        args.peer = "none"
        try:
            out = run_bench(cfg, args)
        except Exception as e:  # noqa: BLE001 - keep going: one failure must not cost the whole lease
            traceback.print_exc()
            out = {"results": {"all": {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}}}
        if line in peers:
            out["peer"] = peers[line]
            if "results" in peers[line]:
                out["ratio"] = peer_ratios(out["results"], peers[line])
        out["command"] = f"smedjan bench {line}"
        out["wall_s"] = time.perf_counter() - t0
        with open(log_path, "a") as f:
            f.write(json.dumps(out) + "\n")
        if "num_params" in out:
            print(format_table(out), flush=True)
        print(f"[run] {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
        summary.extend(summary_row(line, out))
    print(f"\n==== summary ({time.perf_counter() - t_start:.0f}s) ====")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

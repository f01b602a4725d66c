"""Attention benchmark on GPU: this Pallas kernel vs cuDNN, XLA, jax's mha.

FLOP convention (stated in every table): forward = 4*B*Hq*S^2*D, halved when
causal; backward = 2.5x forward, so "fwd+bwd" counts 3.5x the forward FLOPs.

Timing: every implementation is jitted; after warm-up we time ``iters``
back-to-back calls (rotating over 3 fresh random input sets so the numbers
are not an L2/zeros artefact), block_until_ready once at the end, and take the
median over ``reps`` such batches.  All implementations run in one process.

  PYTHONPATH=. python3 benchmarks/attention.py                # full table
  PYTHONPATH=. python3 benchmarks/attention.py --json out.json
  PYTHONPATH=. python3 benchmarks/attention.py --sweep        # tune blocks
  PYTHONPATH=. python3 benchmarks/attention.py --impls pallas,xla \
      --seqs 128 --batch 1 --heads 2 --dim 64 --gqa '' --iters 1 --reps 1
      # CPU smoke test (interpret mode; the numbers mean nothing)
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # no PYTHONPATH
from pallas_kernels.flash_attention import flash_attention


def bench(fn, arg_sets, iters=10, reps=7, warmup=2):
    for _ in range(warmup):
        jax.block_until_ready(fn(*arg_sets[0]))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for i in range(iters):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def make_inputs(B, S, Hq, Hkv, D, n=3, seed=0):
    sets = []
    for i in range(n):
        ks = jax.random.split(jax.random.PRNGKey(seed + i), 4)
        sets.append(
            tuple(
                jax.random.normal(kk, shp, jnp.bfloat16)
                for kk, shp in zip(ks, [(B, S, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D), (B, S, Hq, D)])
            )
        )
    return sets


def impls(causal, Hq, Hkv, pallas_kw=None):
    """name -> f(q, k, v) -> out (bf16 BTNH)."""
    pallas_kw = pallas_kw or {}
    out = {  # "pallas" is the default dispatch: the Mosaic GPU kernel on Hopper
        "pallas": lambda q, k, v: flash_attention(q, k, v, causal=causal, **pallas_kw),
        "pallas_triton": lambda q, k, v: flash_attention(q, k, v, causal=causal, backend="triton", **pallas_kw),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"),
        "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla"),
    }
    try:
        from jax.experimental.pallas.ops.gpu import attention as jax_attn

        def jax_mha(q, k, v):
            g = Hq // Hkv  # jax's mha has no GQA: it gets repeated K/V
            if g > 1:
                k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
            return jax_attn.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal)

        out["jax_mha"] = jax_mha
    except Exception as e:  # pragma: no cover
        print("jax mha unavailable:", e, file=sys.stderr)
    try:  # jax's FA3-style Mosaic GPU kernel (forward; its backward has no causal mask)
        from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

        blk = dict(block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
        cfg = mgpu.TuningConfig(
            block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal, **({} if causal else blk)
        )
        out["jax_mgpu"] = lambda q, k, v: mgpu.attention(q, k, v, cfg)
        out["jax_mgpu_f16"] = out["jax_mgpu"]  # same kernel, fed fp16 inputs
    except Exception as e:  # pragma: no cover
        print("jax attention_mgpu unavailable:", e, file=sys.stderr)
    try:  # Google's kernel library (Python >= 3.12; benchmarks/peers/install_tokamax.sh)
        from benchmarks.peers.tokamax_attention import make_tokamax_attention

        out["tokamax"] = make_tokamax_attention(causal, "mosaic")
    except ImportError as e:
        print("tokamax unavailable:", e, file=sys.stderr)
    return out


def fwd_fn(f):
    return jax.jit(lambda q, k, v, do: f(q, k, v))


def fwdbwd_fn(f):
    def g(q, k, v, do):
        out, vjp = jax.vjp(f, q, k, v)
        return vjp(do)

    return jax.jit(g)


# mode -> (jitted-call builder, FLOPs as a multiple of the forward's)
MODES = {"fwd": (fwd_fn, 1.0), "fwd+bwd": (fwdbwd_fn, 3.5)}


def flops(B, S, Hq, D, causal):
    f = 4.0 * B * Hq * S * S * D
    return f / 2 if causal else f


def run_case(B, S, Hq, Hkv, D, causal, which, iters, reps, pallas_kw=None):
    args = make_inputs(B, S, Hq, Hkv, D)
    args16 = None
    fl = flops(B, S, Hq, D, causal)
    rows = []
    for name, f in impls(causal, Hq, Hkv, pallas_kw).items():
        if which and name not in which:
            continue
        for mode, (mk, mult) in MODES.items():
            if name == "xla" and S * S * B * Hq * 4 > 16e9:
                res = dict(status="skipped (S^2 scores do not fit)")
            else:
                try:
                    if name.endswith("_f16") and args16 is None:
                        args16 = [tuple(a.astype(jnp.float16) for a in s) for s in args]
                    t = bench(mk(f), args16 if name.endswith("_f16") else args, iters=iters, reps=reps)
                    res = dict(ms=t * 1e3, tflops=fl * mult / t / 1e12, status="ok")
                except Exception as e:
                    res = dict(status=f"error: {type(e).__name__}: {str(e)[:120]}")
            rows.append(dict(impl=name, mode=mode, B=B, S=S, Hq=Hq, Hkv=Hkv, D=D, causal=causal, **res))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows):
    lines = ["| case | mode | impl | ms | TFLOP/s | vs cuDNN |", "|---|---|---|---|---|---|"]
    ref = {
        (r["B"], r["S"], r["Hq"], r["Hkv"], r["mode"]): r for r in rows if r["impl"] == "cudnn" and r["status"] == "ok"
    }
    for r in rows:
        case = f"B{r['B']} S{r['S']} H{r['Hq']}/{r['Hkv']} D{r['D']}"
        if r["status"] != "ok":
            lines.append(f"| {case} | {r['mode']} | {r['impl']} | - | - | {r['status']} |")
            continue
        c = ref.get((r["B"], r["S"], r["Hq"], r["Hkv"], r["mode"]))
        ratio = f"{r['tflops'] / c['tflops']:.2f}x" if c else "-"
        lines.append(f"| {case} | {r['mode']} | {r['impl']} | {r['ms']:.3f} | {r['tflops']:.0f} | {ratio} |")
    return "\n".join(lines)


def time_config(kw, mode, args, fl, iters, reps):
    """TF/s of causal flash_attention(**kw) in ``mode`` (printed); None if it fails."""
    make, mult = MODES[mode]
    f = lambda q, k, v: flash_attention(q, k, v, causal=True, **kw)
    try:
        t = bench(make(f), args, iters=iters, reps=reps)
    except Exception as e:
        print(mode, kw, "error", type(e).__name__, flush=True)
        return None
    tf = mult * fl / t / 1e12
    print(f"{mode} {kw} {t * 1e3:.3f} ms {tf:.0f} TF/s", flush=True)
    return tf


def sweep(S, B, H, D, iters, reps):
    """Forward then backward block/warps/stages sweep at one shape (the
    backward sweep times fwd+bwd with the best forward)."""
    args = make_inputs(B, S, H, H, D)
    fl = flops(B, S, H, D, True)

    def best(mode, configs):
        timed = [(time_config(kw, mode, args, fl, iters, reps), kw) for kw in configs]
        timed = [(tf, kw) for tf, kw in timed if tf is not None]
        top = max(timed, key=lambda r: r[0], default=None)
        print(f"BEST {mode}", top, flush=True)
        return top

    best_f = best(
        "fwd",
        [
            dict(block_q=bq, block_k=bk, num_warps=w, num_stages=st)
            for bq, bk, w, st in itertools.product((64, 128), (64, 128), (4, 8), (2, 3))
        ],
    )
    best(
        "fwd+bwd",
        [
            dict(best_f[1], block_q_bwd=bq, block_k_bwd=bk, num_warps_bwd=w, num_stages_bwd=st)
            for (bq, bk), w, st in itertools.product(
                ((32, 64), (64, 64), (32, 128), (64, 128), (128, 64), (128, 128)), (4, 8), (2, 3)
            )
            if not (bq * bk >= 128 * 128 and w == 4)
        ],
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--gqa", type=str, default="32,8", help="Hq,Hkv for the extra GQA case at S=4096 ('' = none)")
    p.add_argument(
        "--impls",
        type=str,
        default="",
        help="comma list among pallas (default dispatch), pallas_triton, cudnn, xla, "
        "jax_mha, jax_mgpu, jax_mgpu_f16, tokamax",
    )
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json", type=str, default="")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-seq", type=int, default=4096)
    p.add_argument(
        "--configs",
        type=str,
        default="",
        help="JSON list of flash_attention kwargs to time at "
        "--sweep-seq (fwd and fwd+bwd), e.g. '[{\"block_q\": 128}]'",
    )
    a = p.parse_args()
    print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
    if a.sweep:
        sweep(a.sweep_seq, a.batch, a.heads, a.dim, a.iters, a.reps)
        return
    if a.configs:
        args = make_inputs(a.batch, a.sweep_seq, a.heads, a.heads, a.dim)
        fl = flops(a.batch, a.sweep_seq, a.heads, a.dim, True)
        for kw in json.loads(a.configs):
            for mode in MODES:
                time_config(kw, mode, args, fl, a.iters, a.reps)
        return
    which = set(filter(None, a.impls.split(",")))
    rows = []
    for S in a.seqs:
        rows += run_case(a.batch, S, a.heads, a.heads, a.dim, True, which, a.iters, a.reps)
    if a.gqa:
        hq, hkv = map(int, a.gqa.split(","))
        S = 4096
        rows += run_case(max(1, a.batch // 2), S, hq, hkv, a.dim, True, which, a.iters, a.reps)
    print("\nFLOPs: fwd = 4*B*Hq*S^2*D/2 (causal); fwd+bwd = 3.5x fwd")
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

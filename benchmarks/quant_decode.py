"""Quantized serving on GPU: decode tokens/s and prefill time of one model in bf16, int8 and int4, same run.

    PYTHONPATH=. python benchmarks/quant_decode.py [--preset 1b] [--batches 1,16] [--kernels] [--json out.json]

* weights: random-init bf16 params of the preset; int8 / int4 (group 128) by `quantize_params` (RTN)
  of the same params, every linear of the layers plus the LM head (a quantized copy of a tied table).
* decode, batch 1: `decode_loop` after a prefill (benchmarks/decode.py's `bench_batch1`, the loop
  `smedjan generate` runs), greedy.
* decode, batch B > 1: the engine's `Runner.step` with B slots busy, `--chunk` steps per dispatch
  (benchmarks/decode.py's `bench_engine`, what the server drives).
* prefill: one `Runner.prefill` of a `--prefill-len`-token prompt, median wall time.
* --kernels: the linears of the 1b shape alone, bf16 XLA dot vs the int8 / int4 Pallas kernels at
  M = 1 and 16 (and a few int4 block configurations), microseconds per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.decode import bench_batch1, bench_engine
from smedjan.config import preset
from smedjan.infer import runner as gen
from smedjan.infer.sampling import SamplingParams
from smedjan.model.transformer import init_params, param_bytes
from smedjan.quant.quantize import quantize_params


def bench_prefill(cfg, w, prompt_len, repeats):
    runner = gen.Runner(w, cfg, 1, gen.next_bucket(prompt_len + 2, minimum=64))
    row = SamplingParams().row(0)
    prompt = np.random.default_rng(2).integers(0, cfg.vocab_size, prompt_len).tolist()
    jax.block_until_ready(runner.prefill([0], [prompt], [row]))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready((runner.prefill([0], [prompt], [row]), runner.state))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _candidates(wb, q8, q4) -> dict:
    from pallas_kernels.int4_matmul import int4_matmul
    from pallas_kernels.matmul import int8_matmul

    def int4(**kw):
        return lambda x: int4_matmul(x, q4.q, q4.scales, q4.offsets, group_size=128, **kw)

    cands = {
        "bf16 xla": lambda x: jnp.dot(x, wb, preferred_element_type=jnp.float32).astype(x.dtype),
        "int8 pallas": lambda x: int8_matmul(x, q8.q, q8.scales),
        "int8 splits=1": lambda x: int8_matmul(x, q8.q, q8.scales, splits=1),
        "int4 pallas": int4(),
    }
    for bn in (32, 128, 256):
        cands[f"int4 bn={bn}"] = int4(block_n=bn)
    cands["int4 splits=1"] = int4(splits=1)
    cands["int4 warps=2"] = int4(num_warps=2)
    cands["int4 warps=8"] = int4(num_warps=8)
    return cands


def kernel_table(iters=50):
    from smedjan.quant.qweight import quantize

    shapes = {"qkv": (2048, 2560), "o": (2048, 2048), "gate_up": (2048, 11264), "down": (5632, 2048)}
    rows = []
    for name, (K, N) in shapes.items():
        w = jax.random.normal(jax.random.key(0), (N, K), jnp.float32) * 0.02
        wb = w.T.astype(jnp.bfloat16)
        q8, q4 = quantize(w, "int8"), quantize(w, "int4", 128)
        for M in (1, 16):
            xs = [jax.random.normal(jax.random.key(i), (M, K), jnp.bfloat16) for i in range(8)]
            cands = _candidates(wb, q8, q4)
            for label, f in cands.items():
                try:
                    prog = jax.jit(lambda *xs, f=f: [f(x) for x in xs])
                    jax.block_until_ready(prog(*xs))
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        out = prog(*xs)
                    jax.block_until_ready(out)
                    us = 1e6 * (time.perf_counter() - t0) / (iters * len(xs))
                    rows.append({"linear": name, "M": M, "kernel": label, "us": us})
                    print(f"  {name:8s} M={M:3d} {label:28s} {us:8.1f} us", flush=True)
                except Exception as e:  # a config the lowering refuses: report and go on
                    print(f"  {name:8s} M={M:3d} {label:28s} FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--schemes", default="bf16,int8,int4")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", default="xla")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    print(f"devices: {jax.devices()}", flush=True)
    results = {}
    cfg = preset(args.preset)
    base = init_params(cfg, jax.random.key(0), jnp.bfloat16)
    batches = [int(b) for b in args.batches.split(",")]
    table = []
    for scheme in args.schemes.split(","):
        params, qcfg = (base, cfg) if scheme == "bf16" else quantize_params(base, cfg, scheme, lm_head=True)
        row = {"scheme": scheme}
        r1, w = bench_batch1(
            qcfg, params, prompt_len=args.prompt_len, new_tokens=args.new_tokens, attn=args.attn, repeats=args.repeats
        )
        row["weight_gb"] = param_bytes(w) / 1e9
        row["b1_tok_s"] = r1["tokens_per_s"]
        row["tokens"] = r1["tokens"][:8]
        print(f"{scheme}: batch 1 {r1['tokens_per_s']:.0f} tok/s ({row['weight_gb']:.2f} GB prepared)", flush=True)
        more = [b for b in batches if b > 1]
        if more:
            eng = bench_engine(
                qcfg,
                w,
                concurrencies=more,
                max_batch=max(more),
                prompt_len=args.prompt_len,
                steps=args.new_tokens,
                repeats=args.repeats,
                chunk=args.chunk,
            )
            for b in more:
                row[f"b{b}_tok_s"] = eng[b]["tokens_per_s"]
        row["prefill_ms"] = 1e3 * bench_prefill(qcfg, w, args.prefill_len, args.repeats)
        print(f"{scheme}: prefill {args.prefill_len} tokens {row['prefill_ms']:.1f} ms", flush=True)
        table.append(row)
        del params, w

    ref = table[0]
    print(f"\n{args.preset}: decode tok/s (x {ref['scheme']}) and prefill of {args.prefill_len} tokens")
    cols = ["b1_tok_s"] + [f"b{b}_tok_s" for b in batches if b > 1]
    print("| scheme | weights GB | " + " | ".join(cols) + " | prefill ms |")
    for r in table:
        cells = [f"{r[c]:,.0f} ({r[c] / ref[c]:.2f}x)" for c in cols]
        pre = f"{r['prefill_ms']:.1f} ({r['prefill_ms'] / ref['prefill_ms']:.2f}x)"
        print(f"| {r['scheme']} | {r['weight_gb']:.2f} | " + " | ".join(cells) + f" | {pre} |")
    results["table"] = table
    if args.kernels:  # after the table: the end-to-end numbers matter more if time runs out
        results["kernels"] = kernel_table()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

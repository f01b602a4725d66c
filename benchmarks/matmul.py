"""Matmul benchmark on GPU: Pallas (Triton lowering) vs jnp.dot (cuBLAS).

Shapes: 4096^3 and 8192^3 bf16, skinny decode shapes (M=16, K=N=4096/8192),
and weight-only int8 (Pallas int8_matmul vs jnp.dot on the dequantised bf16
weight and vs XLA's own fused int8->bf16 convert + dot).  Same timing method
as benchmarks/attention.py (median of batches of back-to-back calls on
rotating fresh random inputs).  For skinny shapes we also report the achieved
weight bandwidth, since they are bound by reading the weight once.

  PYTHONPATH=. python3 benchmarks/matmul.py [--json out.json] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax
import jax.numpy as jnp

from benchmarks.attention import bench
from pallas_kernels.matmul import int8_matmul, matmul

f32 = jnp.float32


def inputs(M, N, K, int8, n=3):
    sets = []
    for i in range(n):
        ka, kb, ks = jax.random.split(jax.random.PRNGKey(i), 3)
        a = jax.random.normal(ka, (M, K), jnp.bfloat16)
        if int8:
            w = jax.random.randint(kb, (K, N), -127, 128, jnp.int32).astype(jnp.int8)
            s = jax.random.uniform(ks, (N,), f32, 1e-3, 2e-2)
            sets.append((a, w, s))
        else:
            sets.append((a, jax.random.normal(kb, (K, N), jnp.bfloat16)))
    return sets


def bench_chain(f, arg_sets, iters, reps, chain=16):
    """Time ``chain`` dependent calls inside ONE jitted program.

    Skinny (decode) matmuls take ~10-50 us on an H100, about what one host
    dispatch of a jitted call costs, so ``bench`` on them measures the host.
    Here call i+1 consumes call i's output as its activation (needs N == K),
    rotating over the input sets, so the GPU runs back-to-back kernels and XLA
    cannot merge the calls.
    """

    def prog(*flat):
        n = len(arg_sets[0])
        sets = [flat[i * n : (i + 1) * n] for i in range(len(arg_sets))]
        x = sets[0][0]
        for i in range(chain):
            a = sets[i % len(sets)]
            x = f(x, *a[1:]).astype(x.dtype)
        return x

    flat = [t for a in arg_sets for t in a]
    t = bench(jax.jit(prog), [flat], iters=iters, reps=reps)
    return t / chain


def run(M, N, K, int8, iters, reps, pallas_kw=None):
    pallas_kw = pallas_kw or {}
    args = inputs(M, N, K, int8)
    fl = 2.0 * M * N * K
    wbytes = K * N * (1 if int8 else 2)
    if int8:
        fns = {
            "pallas_int8": jax.jit(lambda x, w, s: int8_matmul(x, w, s, **pallas_kw)),
            "xla_int8": jax.jit(
                lambda x, w, s: (jnp.dot(x, w.astype(x.dtype), preferred_element_type=f32) * s).astype(x.dtype)
            ),
        }
        # cuBLAS on an already-dequantised bf16 weight (2x the weight bytes).
        wb = [(x, (w.astype(f32) * s).astype(jnp.bfloat16)) for x, w, s in args]
        base = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=f32).astype(x.dtype))
    else:
        fns = {"pallas": jax.jit(lambda a, b: matmul(a, b, **pallas_kw))}
        base = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=f32).astype(a.dtype))
        wb = args
    rows = []
    # Skinny shapes: in-jit dependent chain (see bench_chain); big: per call.
    chain = M <= 64 and N == K
    timer = (
        (lambda f, a: bench_chain(f, a, iters=max(1, iters // 4), reps=reps))
        if chain
        else (lambda f, a: bench(f, a, iters=iters, reps=reps))
    )
    t = timer(base, wb)
    rows.append(
        dict(
            impl="cublas_bf16",
            M=M,
            N=N,
            K=K,
            int8=int8,
            chained=chain,
            ms=t * 1e3,
            tflops=fl / t / 1e12,
            wGBs=K * N * 2 / t / 1e9,
        )
    )
    for name, f in fns.items():
        t = timer(f, args)
        rows.append(
            dict(
                impl=name,
                M=M,
                N=N,
                K=K,
                int8=int8,
                chained=chain,
                ms=t * 1e3,
                tflops=fl / t / 1e12,
                wGBs=wbytes / t / 1e9,
            )
        )
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def table(rows):
    lines = ["| M x N x K | impl | ms | TFLOP/s | weight GB/s | vs cuBLAS bf16 |", "|---|---|---|---|---|---|"]
    # (skinny rows are timed as an in-jit chain of dependent calls)
    key = lambda r: (r["M"], r["N"], r["K"], r["int8"])
    base = {key(r): r for r in rows if r["impl"] == "cublas_bf16"}
    for r in rows:
        b = base[key(r)]
        lines.append(
            f"| {r['M']}x{r['N']}x{r['K']} | {r['impl']} | "
            f"{r['ms']:.4f} | {r['tflops']:.1f} | {r['wGBs']:.0f} | "
            f"{b['ms'] / r['ms']:.2f}x |"
        )
    return "\n".join(lines)


def sweep(iters, reps):
    for M, N, K in [(8192, 8192, 8192)]:
        args = inputs(M, N, K, False)
        for bm, bn, bk, w, st in [
            (128, 256, 64, 8, 3),
            (128, 256, 64, 8, 4),
            (256, 128, 64, 8, 3),
            (128, 128, 64, 4, 4),
            (128, 128, 64, 8, 4),
            (128, 256, 32, 8, 4),
            (256, 128, 64, 8, 4),
            (128, 128, 128, 8, 3),
        ]:
            kw = dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
            try:
                t = bench(jax.jit(lambda a, b, kw=kw: matmul(a, b, **kw)), args, iters=iters, reps=reps)
                print(f"mm {M} {kw} {2 * M * N * K / t / 1e12:.0f} TF/s", flush=True)
            except Exception as e:
                print(f"mm {M} {kw} error {type(e).__name__} {str(e)[:200]}", flush=True)
    for (M, N, K), int8 in itertools.product([(16, 8192, 8192)], (False, True)):
        args = inputs(M, N, K, int8)
        for bn, bk, w, st in itertools.product((32, 64, 128), (128, 256, 512), (4,), (3, 4)):
            kw = dict(block_m=16, block_n=bn, block_k=bk, num_warps=w, num_stages=st)
            fn = (
                (lambda x, w_, s, kw=kw: int8_matmul(x, w_, s, **kw))
                if int8
                else (lambda a, b, kw=kw: matmul(a, b, **kw))
            )
            try:
                t = bench(jax.jit(fn), args, iters=iters, reps=reps)
                print(
                    f"skinny int8={int8} {kw} {t * 1e6:.1f} us {K * N * (1 if int8 else 2) / t / 1e9:.0f} GB/s",
                    flush=True,
                )
            except Exception as e:
                print(f"skinny {kw} error {type(e).__name__}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--json", type=str, default="")
    p.add_argument("--sweep", action="store_true")
    a = p.parse_args()
    print("device:", jax.devices()[0].device_kind, "jax", jax.__version__)
    if a.sweep:
        sweep(a.iters, a.reps)
        return
    rows = []
    for M, N, K in [(4096, 4096, 4096), (8192, 8192, 8192), (16, 4096, 4096), (16, 8192, 8192)]:
        rows += run(M, N, K, False, a.iters, a.reps)
    for M, N, K in [(16, 4096, 4096), (16, 8192, 8192), (4096, 4096, 4096)]:
        rows += run(M, N, K, True, a.iters, a.reps)
    print("\n" + table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""Where does a step's GPU time go? Profiles smedjan's real steps and prints per-op GPU time.

Captures a `jax.profiler` trace of a few calls, reads it back with `jax.profiler.ProfileData`
(no TensorBoard needed) and prints, per call: wall time, summed kernel time, kernel count, and
the top HLO ops by GPU time with a coarse category (matmul / attention / fusion / copy / ...).
Variants of the training step (remat policy, layer-scan unroll, loss chunk) can be timed in
the same process to compare levers on equal footing.

    PYTHONPATH=. python benchmarks/profile_gpu.py train --size 125m --batch 16 --seq-len 1024 \\
        --variants "remat=dots,unroll=1" "remat=dots" "remat=none"
    PYTHONPATH=. python benchmarks/profile_gpu.py decode --size 1b --prompt 128 --new 128
    PYTHONPATH=. python benchmarks/profile_gpu.py forward --size small --batch 4 --seq-len 128

Diagnostic only: the numbers reported in RESULTS.md come from `smedjan bench`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import statistics
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)

CATEGORIES = [  # (category, substrings of a kernel name), first match wins
    (
        "collective",
        (
            "nccl",
            "all-reduce",
            "all_reduce",
            "reduce-scatter",
            "reduce_scatter",
            "all-gather",
            "all_gather",
            "collective-permute",
            "all-to-all",
        ),
    ),
    ("attention", ("fmha", "flash", "cudnn", "attn", "_fwd_kernel", "_dq_kernel", "_dkdv_kernel", "decode_attention")),
    ("matmul", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "matmul", "dot")),
    ("copy", ("memcpy", "memset", "copy", "dynamic_update_slice", "dynamic-update-slice", "dynamic_slice")),
    ("reduce", ("reduce", "scatter", "sort", "topk", "top_k", "argmax")),
    ("fusion", ("fusion", "loop_", "input_", "triton", "concatenate", "convert", "transpose")),
]


def categorize(*names: str) -> str:
    text = " ".join(n.lower() for n in names if n)
    for cat, keys in CATEGORIES:
        if any(k in text for k in keys):
            return cat
    return "other"


def _stats(ev) -> dict:
    out = {}
    try:
        for k, v in list(ev.stats):
            out[k] = v
    except Exception:  # noqa: BLE001 - stats decoding differs across jaxlib versions
        pass
    return out


def profile_calls(fn, n: int = 5, warmup: int = 2) -> dict:
    """Trace `n` calls of `fn` (each followed by block_until_ready) after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    d = tempfile.mkdtemp(prefix="smedjan_prof_")
    walls = []
    with jax.profiler.trace(d):
        for _ in range(n):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            walls.append(time.perf_counter() - t0)
    pbs = glob.glob(d + "/**/*.xplane.pb", recursive=True)
    if not pbs:
        return {"error": "no xplane.pb written", "wall_ms": statistics.median(walls) * 1e3}
    pdata = jax.profiler.ProfileData.from_file(pbs[0])
    ops = collections.defaultdict(lambda: [0.0, 0, "", ""])  # key -> [ns, count, category, example kernel]
    busy = 0.0
    kernels = 0
    lines_seen = set()
    per_device = collections.defaultdict(collections.Counter)  # plane -> category -> ns
    for plane in pdata.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            lines_seen.add(line.name)
            # Kernel/memcpy activity lives on the "Stream #..." lines; "XLA Ops"/"XLA Modules" lines
            # repeat the same time at the HLO level, so count streams only.
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                st = _stats(ev)
                hlo = str(st.get("hlo_op", "") or "")
                # Inside a command buffer (CUDA graph) hlo_op names the whole graph: key by kernel.
                key = ev.name if not hlo or hlo.startswith("command_buffer") else hlo
                rec = ops[key]
                rec[0] += ev.duration_ns
                rec[1] += 1
                rec[2] = rec[2] or categorize(ev.name, hlo)
                rec[3] = rec[3] or ev.name[:80]
                per_device[plane.name][categorize(ev.name, hlo)] += ev.duration_ns
                busy += ev.duration_ns
                kernels += 1
    by_cat = collections.Counter()
    for ns, _, cat, _ in ops.values():
        by_cat[cat] += ns
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])
    return {
        "wall_ms": statistics.median(walls) * 1e3,
        "gpu_busy_ms_per_call": busy / n / 1e6,
        "kernels_per_call": kernels / n,
        "by_category_ms": {k: v / n / 1e6 for k, v in by_cat.most_common()},
        "top_ops": [
            {"op": k, "ms": v[0] / n / 1e6, "count": v[1] / n, "cat": v[2], "kernel": v[3]} for k, v in top[:60]
        ],
        "gpu_lines": sorted(lines_seen),
        # with several GPUs: each one's kernel time by category (collectives run on their own
        # stream, so a device's total above its wall time means they overlapped compute)
        "per_device_ms": {
            dev: {k: v / n / 1e6 for k, v in cats.most_common()} for dev, cats in sorted(per_device.items())
        },
    }


def print_profile(title: str, prof: dict, top: int) -> None:
    print(f"\n=== {title}")
    if "error" in prof:
        print("  ", prof)
        return
    print(
        f"  wall {prof['wall_ms']:.3f} ms/call, GPU kernels {prof['gpu_busy_ms_per_call']:.3f} ms/call "
        f"({prof['kernels_per_call']:.0f} kernels/call)"
    )
    print("  by category (ms/call): " + ", ".join(f"{k} {v:.3f}" for k, v in prof["by_category_ms"].items()))
    if len(prof.get("per_device_ms", {})) > 1:
        for dev, cats in prof["per_device_ms"].items():
            print(f"  {dev}: {sum(cats.values()):.3f} ms: " + ", ".join(f"{k} {v:.3f}" for k, v in cats.items()))
    print(f"  {'ms/call':>9} {'n/call':>7}  {'cat':<9} op  [kernel]")
    for r in prof["top_ops"][:top]:
        print(f"  {r['ms']:9.3f} {r['count']:7.1f}  {r['cat']:<9} {r['op'][:60]}  [{r['kernel'][:50]}]")
    sys.stdout.flush()


def time_calls(fn, iters: int, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


# ---- targets ---------------------------------------------------------------------------------------
def parse_variant(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        k, v = part.split("=", 1)
        if v.lower() in ("true", "false"):
            out[k] = v.lower() == "true"
        else:
            try:
                out[k] = int(v)
            except ValueError:
                out[k] = v
    return out


REMAT_EXTRA = {
    # dots + the attention output saved by name (the fwd kernel is then not re-run for the bwd)
    "dots_attn": lambda: jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("attn_out"),
    ),
    "dots_saveable": lambda: jax.checkpoint_policies.dots_saveable,
    "dots_mlp": lambda: jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("mlp_act"),
    ),
    "dots_mlp_attn": lambda: jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("mlp_act", "attn_out"),
    ),
}


def train_fn(cfg, args, variant: dict):
    """The trainer's own step (`make_train_step`) with the variant's knobs; returns a no-arg call."""
    from smedjan.model import transformer
    from smedjan.runconfig import OptimConfig
    from smedjan.train import step as ts

    remat = variant.get("remat", args.remat)
    if remat in REMAT_EXTRA:
        transformer.REMAT_POLICIES[remat] = REMAT_EXTRA[remat]()
    optimizer = ts.make_optimizer(OptimConfig())
    state = ts.init_train_state(cfg, jax.random.PRNGKey(0), optimizer)
    step = ts.make_train_step(
        cfg,
        optimizer,
        attn_impl=variant.get("attn", args.attn),
        remat=remat,
        loss_chunk=variant.get("loss_chunk", args.loss_chunk),
        scan_unroll=variant.get("unroll"),
    )
    batch = variant.get("batch", args.batch)
    toks = jax.random.randint(jax.random.PRNGKey(1), (batch, args.seq_len + 1), 0, cfg.vocab_size, jnp.int32)
    holder = {"s": state}

    def call():
        holder["s"], m = step(holder["s"], {"tokens": toks})
        return m

    return call, batch * args.seq_len


def decode_fn(cfg, args, variant: dict):
    from smedjan.infer import runner as gen
    from smedjan.infer.sampling import SamplingParams, sampling_mode
    from smedjan.model.transformer import init_params

    attn = variant.get("attn", args.attn)
    total = args.prompt + args.new + 1
    max_len = gen.next_bucket(total, minimum=64)
    params = init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    runner = gen.Runner(params, cfg, 1, max_len, dtype=jnp.bfloat16, attn_impl=attn)
    del params
    rng = np.random.default_rng(0)
    row = SamplingParams(max_new_tokens=args.new, temperature=0.0).row(0)
    kv_len = gen.next_bucket(total, max_len)
    first = runner.prefill([0], [rng.integers(0, cfg.vocab_size, args.prompt).tolist()], [row])

    def call():
        # Re-decoding from the same prefilled position each call: same work every time.
        runner.state = dict(runner.state, pos=jnp.full((1,), args.prompt, jnp.int32))
        toks, *_ = runner.loop(first, np.ones(1, bool), [-1], args.new, kv_len, sampling=sampling_mode([row]))
        return toks

    return call, args.new


def forward_fn(cfg, args, variant: dict):
    from smedjan.model.transformer import forward, init_params

    params = init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    toks = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.seq_len), 0, cfg.vocab_size, jnp.int32)
    f = jax.jit(
        partial(forward, cfg=cfg, attn_impl=variant.get("attn", args.attn), scan_unroll=variant.get("unroll", 1))
    )
    return (lambda: f(params, toks)), args.batch * args.seq_len


TARGETS = {"train": train_fn, "decode": decode_fn, "forward": forward_fn}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", choices=sorted(TARGETS))
    p.add_argument("--size", default="125m")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--attn", default="auto")
    p.add_argument("--remat", default="auto")
    p.add_argument("--loss-chunk", type=int, default=None)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument(
        "--variants",
        nargs="*",
        default=[""],
        help="comma lists of knob=value (remat, unroll, attn, loss_chunk, batch; unset = the "
        "trainer's default); one run each",
    )
    p.add_argument("--profile", choices=["first", "all", "none"], default="first")
    p.add_argument("--calls", type=int, default=4, help="profiled calls")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from smedjan.config import preset

    cfg = preset(args.size)
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  target {args.target} size {args.size}")
    results = []
    for i, vtext in enumerate(args.variants):
        variant = parse_variant(vtext)
        t0 = time.perf_counter()
        try:
            fn, tokens = TARGETS[args.target](cfg, args, variant)
            sec = time_calls(fn, args.iters, args.repeats)
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
            print(f"variant {vtext!r}: FAILED {type(e).__name__}: {str(e)[:400]}")
            results.append({"variant": vtext, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            continue
        rec = {
            "variant": vtext,
            "ms_per_call": sec * 1e3,
            "tokens_per_s": tokens / sec,
            "setup_and_time_s": time.perf_counter() - t0,
        }
        print(
            f"variant {vtext or '(defaults)'!r}: {sec * 1e3:.3f} ms/call, {tokens / sec:,.0f} tok/s "
            f"({rec['setup_and_time_s']:.0f} s incl. compile)"
        )
        sys.stdout.flush()
        if args.profile == "all" or (args.profile == "first" and i == 0):
            prof = profile_calls(fn, n=args.calls)
            print_profile(f"{args.target} {vtext or '(defaults)'}", prof, args.top)
            rec["profile"] = prof
        results.append(rec)
        del fn
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Multi-device scaling of the real training step: 1 device vs N devices, data parallel and FSDP.

    python benchmarks/scaling.py --size 1b --batch 16 --seq-len 2048 --steps 12 --remat dots
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/scaling.py --size tiny \
        --batch 8 --seq-len 64 --steps 4 --precision fp32      # CPU check of the mechanics

Every run uses the same initial parameters (same key) and the same global batches, so the
per-step losses must agree across meshes (bf16 noise only). Reports tokens/s, MFU per device
and scaling efficiency = N-device tokens/s / (N x 1-device tokens/s). Finally a checkpoint
written on the largest mesh is resumed on one device (and vice versa) and the next step's loss
compared with the uninterrupted run.

On NVIDIA machines keep NCCL's NVLink multicast off (NCCL_NVLS_ENABLE=0): set below before jax loads.
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from smedjan.config import preset  # noqa: E402
from smedjan.hardware import peak_flops_for  # noqa: E402
from smedjan.runconfig import OptimConfig, ScheduleConfig  # noqa: E402
from smedjan.sharding import batch_sharding, make_mesh, put_batch  # noqa: E402
from smedjan.train.checkpointing import load_checkpoint, save_checkpoint  # noqa: E402
from smedjan.train.step import (
    init_train_state,
    make_optimizer,
    make_train_step,  # noqa: E402
    state_shardings,
)


def batches(cfg, n, batch, seq_len, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32) for _ in range(n)]


def run_mesh(cfg, spec, devices, data, args, dtype, grad_accum):
    mesh = make_mesh(spec, devices)
    opt = make_optimizer(OptimConfig(lr=3e-4), ScheduleConfig(warmup_steps=2), total_steps=1000)
    state = init_train_state(cfg, jax.random.key(0), opt, mesh=mesh)
    step = make_train_step(
        cfg, opt, attn_impl=args.attn, remat=args.remat, compute_dtype=dtype, grad_accum=grad_accum, mesh=mesh
    )
    sh = batch_sharding(mesh)
    losses, times = [], []
    for tokens in data:
        batch = {"tokens": put_batch(tokens, sh)}
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        loss = float(metrics["loss"])  # syncs: each step is timed whole
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    timed = times[args.warmup :]
    tok_s = args.batch * args.seq_len / statistics.median(timed)
    return mesh, opt, step, state, losses, tok_s


def profile_step(step, state, tokens, mesh, title):
    """GPU time of two more steps, per device and by category (printed); returns it with the new state."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from profile_gpu import print_profile, profile_calls

    batch = {"tokens": put_batch(tokens, batch_sharding(mesh))}
    holder = {"s": state}

    def call():
        holder["s"], m = step(holder["s"], batch)
        return m

    prof = profile_calls(call, n=2, warmup=1)
    print_profile(title, prof, top=12)
    return {**prof, "state": holder["s"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1b")
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="steps excluded from timing (compilation)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument(
        "--single-accum",
        type=int,
        default=None,
        help="gradient accumulation of the 1-device run only (default --grad-accum): the same "
        "global batch at the per-device batch of the N-device runs, when it does not fit whole",
    )
    ap.add_argument("--remat", default="dots")
    ap.add_argument("--attn", default="auto")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--devices", type=int, default=0, help="N (default: all)")
    ap.add_argument(
        "--runs",
        default="1,dp,fsdp",
        help="comma list of 1 (one device: the scaling baseline), dp (data parallel), fsdp",
    )
    ap.add_argument("--no-resume", action="store_true", help="skip the cross-mesh checkpoint check")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after each run's timed steps, profile 2 more steps and print GPU time per device "
        "by category (collectives apart; benchmarks/profile_gpu.py)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    wanted = set(args.runs.split(","))
    if wanted - {"1", "dp", "fsdp"}:
        ap.error(f"--runs takes 1, dp, fsdp; got {args.runs!r}")

    cfg = preset(args.size)
    dtype = jnp.bfloat16 if args.precision == "bf16" else None
    devs = jax.devices()
    n = args.devices or len(devs)
    data = batches(cfg, args.steps, args.batch, args.seq_len)
    peak = peak_flops_for(devs[0].device_kind)
    flops_tok = cfg.flops_per_token(args.seq_len)

    runs = {"1 device": ("data=1", devs[:1])} if "1" in wanted else {}
    if n > 1 and "dp" in wanted:
        runs[f"data parallel x{n}"] = (f"data={n}", devs[:n])
    if n > 1 and "fsdp" in wanted:
        runs[f"fsdp x{n}"] = (f"fsdp={n}", devs[:n])
    if not runs:
        ap.error(f"--runs {args.runs!r} leaves nothing to run on {n} device(s)")
    if not args.json:
        print(
            f"{args.size}: batch {args.batch} x {args.seq_len}, {args.precision}, remat={args.remat}, "
            f"attn={args.attn}, device {devs[0].device_kind}"
        )
        print(f"{'run':<22}{'tok/s':>12}{'MFU/dev':>9}{'scaling':>9}{'max |dloss|':>13}  first losses", flush=True)
    results, last = {}, None
    for name, (spec, d) in runs.items():
        accum = args.single_accum if len(d) == 1 and args.single_accum else args.grad_accum
        mesh, opt, step, state, losses, tok_s = run_mesh(cfg, spec, d, data, args, dtype, accum)
        ndev = len(d)
        r = results[name] = {
            "mesh": spec,
            "devices": ndev,
            "tokens_per_s": tok_s,
            "losses": losses,
            "mfu_per_device": None if peak is None else tok_s * flops_tok / ndev / peak,
        }
        base = results.get("1 device", {"tokens_per_s": float("nan"), "losses": [float("nan")]})
        r["scaling_efficiency"] = tok_s / (ndev * base["tokens_per_s"])
        r["max_loss_diff_vs_1"] = max(abs(a - b) for a, b in zip(losses, base["losses"]))
        if not args.json:  # row by row, so a run cut short still shows what finished
            mfu = "n/a" if r["mfu_per_device"] is None else f"{100 * r['mfu_per_device']:.1f}%"
            print(
                f"{name:<22}{tok_s:>12,.0f}{mfu:>9}{100 * r['scaling_efficiency']:>8.1f}%"
                f"{r['max_loss_diff_vs_1']:>13.2e}  {[round(x, 4) for x in losses[:3]]}",
                flush=True,
            )
        if args.profile:
            r["profile"] = profile_step(step, state, data[-1], mesh, name)
            state = r["profile"].pop("state")
        last = (mesh, opt, step, state)

    if args.no_resume:
        if args.json:
            print(json.dumps({"config": vars(args), "results": results}, indent=2))
        return

    # Resume across meshes: checkpoint from the last (largest) mesh, one more step on 1 device.
    mesh, opt, step, state = last
    extra = batches(cfg, 1, args.batch, args.seq_len, seed=1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(tmp, state, {"step": args.steps})
        _, ref = step(state, {"tokens": put_batch(extra, batch_sharding(mesh))})
        one = make_mesh("data=1", devs[:1])
        sh = state_shardings(cfg, opt, one)
        template = jax.eval_shape(lambda: init_train_state(cfg, jax.random.key(0), opt))
        restored, _ = load_checkpoint(ckpt, template, sh)
        ckpt1 = save_checkpoint(os.path.join(tmp, "one"), restored, {"step": args.steps})  # written on 1
        step1 = make_train_step(cfg, opt, attn_impl=args.attn, remat=args.remat, compute_dtype=dtype, mesh=one)
        _, got = step1(restored, {"tokens": put_batch(extra, batch_sharding(one))})
        back, _ = load_checkpoint(ckpt1, template, state_shardings(cfg, opt, mesh))  # and vice versa
        _, got_back = step(back, {"tokens": put_batch(extra, batch_sharding(mesh))})
    resume = {
        "from": results[list(runs)[-1]]["mesh"],
        "to": "data=1",
        "loss_continuing": float(ref["loss"]),
        "loss_resumed": float(got["loss"]),
        "loss_resumed_back": float(got_back["loss"]),
    }

    if args.json:
        print(json.dumps({"config": vars(args), "results": results, "resume": resume}, indent=2))
        return
    print(
        f"resume {resume['from']} -> {resume['to']}: next-step loss {resume['loss_continuing']:.5f} continuing, "
        f"{resume['loss_resumed']:.5f} resumed; saved on data=1, resumed on {resume['from']}: "
        f"{resume['loss_resumed_back']:.5f}"
    )


if __name__ == "__main__":
    main()

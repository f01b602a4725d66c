"""Training checkpoints on a GPU: the step stall and save time of a save, and CPU <-> GPU resume.

    python benchmarks/ckpt_bench.py stall --size 1b --batch 8 --seq-len 1024
    python benchmarks/ckpt_bench.py cross          # needs a GPU (and runs the CPU backend beside it)

`stall` trains the preset on one device and saves once mid-run with each writer: the synchronous writer
that smedjan used before orbax (every array gathered to host memory, one safetensors file written
and fsync'ed on the training thread; `legacy_save` below is that code, from commit e125b12),
`CheckpointWriter` (orbax: arrays copied to host memory, files written in the background) and the same
with `device_copy` (a copy on the device first; the host copy runs in the background too). It reports
the training thread's stall (the save call plus what the steps trained while it writes in the
background lost, against the median step before it), the time until the checkpoint is complete on disk, and the restore time,
and checks that the background-saved values are those of the step saved (the steps that follow
donate their buffers).

`cross` trains a small model 3 steps on the CPU backend (JAX_PLATFORMS=cpu) and resumes it on the
GPU for step 4, and the other way round, and compares step 4's loss with an uninterrupted CPU run:
equal within bf16 tolerance (the GPU computes in bf16 over fp32 master weights).
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BF16_TOL = 2e-2  # relative: bf16 compute vs fp32 after 3 steps of a small model


# ---- the synchronous writer smedjan had before orbax (smedjan/train/checkpointing.py at e125b12) -------------
def legacy_save(run_dir, state, meta: dict) -> Path:
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    from smedjan.train.checkpointing import _fsync_dir

    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    tensors = {jax.tree_util.keystr(p): np.array(np.asarray(jax.device_get(v)), order="C") for p, v in leaves}
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{meta['step']:08d}", root / f"step_{meta['step']:08d}.tmp"
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"), metadata={"format": "smedjan-train-state"})
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    with open(tmp / "state.safetensors", "rb") as f:
        os.fsync(f.fileno())
    tmp.rename(final)
    _fsync_dir(root)
    return final


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stall(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from smedjan.config import preset
    from smedjan.runconfig import OptimConfig, ScheduleConfig
    from smedjan.train import checkpointing as ck
    from smedjan.train.step import _init_fn, init_train_state, make_optimizer, make_train_step

    cfg = preset(args.size)
    opt = make_optimizer(OptimConfig(lr=1e-4), ScheduleConfig(warmup_steps=2), total_steps=1000)
    step = make_train_step(cfg, opt, compute_dtype=jnp.bfloat16, remat=args.remat)
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (args.batch, args.seq_len + 1), dtype=np.int32))}
    template = jax.eval_shape(_init_fn(cfg, opt, jnp.float32), jax.random.key(0))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(template))
    print(
        f"{args.size}: {cfg.num_params() / 1e9:.2f}B params, train state {nbytes / 2**30:.1f} GiB (fp32 params + AdamW), "
        f"batch {args.batch} x {args.seq_len}, {jax.devices()[0].device_kind}, jax {jax.__version__}",
        flush=True,
    )
    state = init_train_state(cfg, jax.random.key(0), opt)
    for _ in range(2):  # compile + warm up
        state, m = step(state, batch)
    float(m["loss"])
    rows = {}
    for mode in args.writers.split(","):
        tmp = Path(tempfile.mkdtemp(prefix="ckpt_bench_", dir=args.dir))
        writer = None if mode == "legacy" else ck.CheckpointWriter(tmp, keep=1, device_copy=mode == "orbax-copy")
        times, saved, i = [], None, 0
        # train on until the background save is done, so its cost to the steps beside it is all counted
        while i < args.steps or (writer is not None and writer.in_flight and i < 2000):
            t0 = time.perf_counter()
            state, m = step(state, batch)
            float(m["loss"])  # each step timed whole
            t1 = time.perf_counter()
            times.append(t1 - t0)
            if i == args.save_at:
                probe = np.asarray(state.params["model.layers.mlp.down_proj.weight"][0, :4, :4])
                ts = time.perf_counter()
                saved = legacy_save(tmp, state, {"step": i}) if writer is None else writer.save(state, {"step": i})
                blocking = time.perf_counter() - ts
            i += 1
        if writer is not None:
            writer.close()
            total = writer.seconds["total"]
        else:
            total = blocking
        base = statistics.median(times[: args.save_at + 1])
        after = times[args.save_at + 1 :]
        lost = sum(max(0.0, t - base) for t in after)
        tr = time.perf_counter()
        restored, _ = ck.load_checkpoint(saved, template, verify=False)
        jax.block_until_ready(restored)
        restore_s = time.perf_counter() - tr
        tv = time.perf_counter()
        ck.check_checkpoint(saved)
        verify_s = time.perf_counter() - tv
        same = np.array_equal(np.asarray(restored.params["model.layers.mlp.down_proj.weight"][0, :4, :4]), probe)
        del restored
        rows[mode] = dict(
            step_ms=1e3 * base,
            save_call_s=blocking,
            next_steps_lost_s=lost,
            stall_s=blocking + lost,
            on_disk_s=total,
            restore_s=restore_s,
            verify_s=verify_s,
            gib=_du(saved) / 2**30,
            values_ok=bool(same),
            after_ms=[round(1e3 * t, 1) for t in after],
        )
        print(mode, json.dumps(rows[mode]), flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n{'writer':<12}{'step ms':>9}{'save call s':>13}{'lost after s':>14}{'stall s':>9}{'on disk s':>11}"
        f"{'restore s':>11}{'sha256 s':>10}{'GiB':>7}  values"
    )
    for mode, r in rows.items():
        print(
            f"{mode:<12}{r['step_ms']:>9.1f}{r['save_call_s']:>13.2f}{r['next_steps_lost_s']:>14.2f}{r['stall_s']:>9.2f}"
            f"{r['on_disk_s']:>11.2f}{r['restore_s']:>11.2f}{r['verify_s'] if mode != 'legacy' else 0:>10.2f}"
            f"{r['gib']:>7.1f}  {'ok' if r['values_ok'] else 'DIFFER'}"
        )
    if not all(r["values_ok"] for r in rows.values()):
        sys.exit("a restored checkpoint differs from the state it saved")


# ---- CPU <-> GPU ---------------------------------------------------------------------------------------
SMALL = ["--size", "tiny", "--dim", "128", "--layers", "2", "--heads", "4", "--ffn-dim", "256", "--seq-len", "64"]
SMALL += ["--batch-size", "8", "--steps", "4", "--lr", "3e-3", "--warmup-steps", "1", "--log-every", "1"]
SMALL += ["--eval-every", "0", "--eval-batches", "1", "--save-every", "0", "--no-export", "--no-progress"]


def _train(backend: str, out: Path, data, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if backend == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    precision = "fp32" if backend == "cpu" else "bf16"
    cmd = [sys.executable, "-m", "smedjan", "train", "--dataset", data.dataset, "--tokenizer", data.tokenizer]
    cmd += [*SMALL, "--precision", precision, "--out", str(out), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _done(name: str, proc: subprocess.Popen) -> None:
    out, _ = proc.communicate()
    if proc.returncode:
        sys.exit(f"{name} failed:\n{out[-3000:]}")


def _loss(run: Path, step: int) -> float:
    return [r["loss"] for r in map(json.loads, open(run / "log.jsonl")) if r.get("step") == step and "loss" in r][0]


def cross(args) -> None:
    from smedjan.data import prepare_corpus
    from smedjan.runconfig import DataConfig

    tmp = Path(tempfile.mkdtemp(prefix="ckpt_cross_", dir=args.dir))
    data = prepare_corpus(tmp / "prep", DataConfig(corpus=("bundled",), tokenizer_vocab=512))
    runs = {name: tmp / name for name in ("cpu_straight", "cpu_split", "gpu_split")}
    procs = {
        "cpu_straight": _train("cpu", runs["cpu_straight"], data),
        "cpu_split": _train("cpu", runs["cpu_split"], data, "--stop-after", "3"),
        "gpu_split": _train("gpu", runs["gpu_split"], data, "--stop-after", "3"),
    }
    for name, p in procs.items():
        _done(name, p)
    shutil.copytree(runs["cpu_split"], tmp / "cpu_to_gpu")
    shutil.copytree(runs["gpu_split"], tmp / "gpu_to_cpu")
    procs = {
        "cpu_to_gpu": _train("gpu", tmp / "cpu_to_gpu", data, "--resume"),
        "gpu_to_cpu": _train("cpu", tmp / "gpu_to_cpu", data, "--resume"),
    }
    for name, p in procs.items():
        _done(name, p)
    ref = _loss(runs["cpu_straight"], 4)
    print(
        f"\n{'written on -> resumed on':<28}{'step 4 loss':>12}{'uninterrupted CPU':>19}{'rel diff':>10}  within bf16"
    )
    bad = False
    for name, label in (("cpu_to_gpu", "CPU fp32 -> GPU bf16"), ("gpu_to_cpu", "GPU bf16 -> CPU fp32")):
        got = _loss(tmp / name, 4)
        rel = abs(got - ref) / abs(ref)
        bad |= rel > BF16_TOL
        print(f"{label:<28}{got:>12.5f}{ref:>19.5f}{rel:>10.2e}  {'yes' if rel <= BF16_TOL else 'NO'}")
    shutil.rmtree(tmp, ignore_errors=True)
    if bad:
        sys.exit(f"a resumed step 4 loss is further than {BF16_TOL} (relative) from the uninterrupted run's")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stall", help="step stall and save time of one save: legacy vs orbax")
    s.add_argument("--size", default="1b")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--seq-len", type=int, default=1024)
    s.add_argument("--remat", default="dots")
    s.add_argument("--steps", type=int, default=10, help="timed steps per writer")
    s.add_argument("--save-at", type=int, default=3, help="the step (0-based) after which it saves")
    s.add_argument(
        "--writers",
        default="legacy,orbax,orbax-copy",
        help="legacy (sync, gathered), orbax (async, sharded), orbax-copy (the same after a copy on the device)",
    )
    c = sub.add_parser("cross", help="CPU -> GPU and GPU -> CPU resume")
    for p in (s, c):
        p.add_argument("--dir", default=None, help="where checkpoints are written (default: the temp folder)")
    args = ap.parse_args(argv)
    stall(args) if args.cmd == "stall" else cross(args)


if __name__ == "__main__":
    main()

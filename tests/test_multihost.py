"""Multi-host training for real: two processes on loopback (jax.distributed, CPU collectives over gloo), two
fake CPU devices each, train on an FSDP mesh spanning both, write sharded checkpoints (each process its own
shards), stop and resume, and give the per-step losses of one process with the same four devices. A
checkpoint written by the two processes resumes on one device, and one written on one device resumes on
the two processes."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from smedjan.data import prepare
from smedjan.tokenizer import train_tokenizer

pytestmark = pytest.mark.slow  # ~4 CPU-minutes (8 processes, 5 compilations): the CI's second stage

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--size", "tiny", "--dim", "32", "--layers", "2", "--heads", "2", "--ffn-dim", "64", "--batch-size", "8"]
ARGS += ["--seq-len", "16", "--precision", "fp32", "--steps", "8", "--save-every", "3", "--log-every", "1"]
ARGS += ["--eval-every", "0", "--eval-batches", "1", "--lr", "3e-3", "--warmup-steps", "1", "--no-progress"]
ARGS += ["--no-export", "--loss-chunk", "64"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mh")
    src = root / "c.txt"
    src.write_text("\n".join(f"line {i}: the rain in spain stays mainly in the plain" for i in range(400)))
    train_tokenizer([str(src)], root / "tok", vocab_size=300, progress=False)
    prepare([str(src)], root / "tok", root / "data", val_fraction=0.05, progress=False)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(data, out, *extra, processes=1, devices=4):
    """`smedjan train` in `processes` processes of `devices` fake CPU devices each (all on one mesh)."""
    base = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "smedjan", "train", "--dataset", str(data / "data"), "--tokenizer", str(data / "tok")]
    cmd += [*ARGS, "--out", str(out), *extra]
    port, procs = _free_port(), []
    for pid in range(processes):
        env = dict(base)
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes))
            env["JAX_PROCESS_ID"] = str(pid)
        dist = ["--distributed"] if processes > 1 else []
        procs.append(subprocess.Popen([*cmd, *dist], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-4000:]
    return outs


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, open(run / "log.jsonl")) if "loss" in r}


def test_two_processes_train_checkpoint_and_resume_like_one(data, tmp_path):
    ref, run = tmp_path / "one_process", tmp_path / "two_processes"
    _run(data, ref, "--mesh", "fsdp=4")
    outs = _run(data, run, "--mesh", "fsdp=4", "--stop-after", "5", processes=2, devices=2)
    assert "'fsdp': 4" in outs[0]
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step_00000003", "step_00000005"]
    # every process wrote its own shards: orbax's per-process OCDBT folders
    assert {p.name for p in (run / "checkpoints" / "step_00000005" / "state").glob("ocdbt.process_*")} == {
        "ocdbt.process_0",
        "ocdbt.process_1",
    }
    shutil.copytree(run, tmp_path / "to_one")
    outs = _run(data, run, "--mesh", "fsdp=4", "--resume", processes=2, devices=2)
    assert "resumed from" in outs[0] and "step 5" in outs[0]
    a, b = _losses(ref), _losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in a:  # the same program on the same four devices; only the collectives' transport differs
        assert abs(a[s] - b[s]) <= 1e-6 * abs(a[s]), (s, a, b)

    # written by two processes (FSDP over 4) -> resumed on 1 device for one step -> back on the two processes
    mixed = tmp_path / "to_one"
    _run(data, mixed, "--resume", "--stop-after", "1", devices=1)
    _run(data, mixed, "--mesh", "fsdp=4", "--resume", processes=2, devices=2)
    c = _losses(mixed)
    assert sorted(c) == list(range(1, 9))
    for s in a:  # one device sums in another order: fp32 noise only
        assert abs(a[s] - c[s]) <= 1e-4 * abs(a[s]), (s, a, c)

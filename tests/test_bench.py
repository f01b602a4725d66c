"""`smedjan bench` on the tiny preset: runs, prints the table, --json has the expected keys.

No timing asserts: CI machines vary; only structure and sanity (positive, finite) are checked.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from smedjan.bench import format_table
from smedjan.cli import main

FAST = [
    "--size",
    "tiny",
    "--layers",
    "2",
    "--batch",
    "2",
    "--seq-len",
    "16",
    "--iters",
    "2",
    "--repeats",
    "2",
    "--warmup",
    "1",
    "--decode-tokens",
    "4",
]


def _has_trainer() -> bool:
    return importlib.util.find_spec("smedjan.train.step") is not None


@pytest.fixture(scope="module")
def bench_json():
    """One full run (all three columns) shared by the tests: compiling the train step dominates."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["bench", *FAST, "--json"]) == 0
    return json.loads(buf.getvalue())


def test_bench_table(capsys, bench_json):
    assert main(["bench", *FAST, "--columns", "forward,decode"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "MFU" in out and "peak mem" in out
    for col in ("forward", "decode"):
        assert any(line.startswith(col) for line in out.splitlines()), out
    assert "FLOPs:" in out
    table = format_table(bench_json)
    assert any(line.startswith("train") for line in table.splitlines()), table


def test_bench_json(bench_json):
    out = bench_json
    for key in (
        "model",
        "config",
        "num_params",
        "batch",
        "seq_len",
        "attn",
        "remat",
        "dtype",
        "backend",
        "device",
        "peak_flops",
        "flop_formula",
        "results",
    ):
        assert key in out
    assert out["model"] == "tiny" and out["batch"] == 2 and out["seq_len"] == 16
    assert set(out["results"]) == {"forward", "decode", "train"}
    cols = ["forward", "decode"] + (["train"] if _has_trainer() else [])
    for col in cols:
        r = out["results"][col]
        assert "error" not in r, r
        for key in ("tokens_per_s", "step_ms", "tflops", "mfu", "peak_mem_bytes", "times_s"):
            assert key in r
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"])
        assert len(r["times_s"]) == 2
    if out["peak_flops"] is None:  # CPU: MFU is n/a
        assert all(out["results"][c]["mfu"] is None for c in cols)
    assert out["results"]["decode"]["decode_tokens"] == 4


def test_bench_errors():
    assert main(["bench", *FAST, "--columns", "nope"]) == 1
    assert main(["bench", "--size", "no-such-preset", "--iters", "1"]) == 1
    assert main(["bench", *FAST[:-2], "--batch", "0"]) == 1
    assert main(["bench", *FAST, "--remat", "bogus"]) == 1
    assert main(["bench", *FAST, "--grad-accum", "3"]) == 1


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="torch/transformers not installed",
)
def test_bench_peer_torch_eager(capsys):
    assert main(["bench", *FAST, "--columns", "forward", "--peer", "torch", "--peer-modes", "eager", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["results"]) == ["forward"]
    peer = out["peer"]
    assert "error" not in peer, peer
    assert set(peer["results"]["eager"]) == {"forward"}
    assert out["ratio"]["forward"]["eager"] > 0
    assert "peer: torch" in format_table(out)


@pytest.fixture
def torch_peer():
    """benchmarks/torch_peer.py as a module (it is a script beside the benchmarks, not in the package)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import torch_peer

    return torch_peer


def test_torch_peer_train_with_gradient_checkpointing(torch_peer, monkeypatch):
    """The peer's fallback for a batch that does not fit (the 1b shape): HF gradient checkpointing
    really on (a layer runs twice per step: forward, and again in the backward), the step still
    trains, and the result says so."""
    from smedjan.config import preset

    calls = []
    build = torch_peer.build_model

    def counted(*a, **k):
        model = build(*a, **k)
        # a pre-hook: the recompute stops early, once the last saved tensor is back, before the MLP returns
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        return model

    monkeypatch.setattr(torch_peer, "build_model", counted)
    hf = preset("tiny", num_hidden_layers=2, vocab_size=128).to_hf_dict()
    kw = dict(iters=1, repeats=1, warmup=0, modes=("eager",), columns=("train",))
    for checkpointing, runs in (("off", 1), ("on", 2)):
        calls.clear()
        r = torch_peer.run_peer(hf, 2, 16, grad_checkpointing=checkpointing, **kw)["results"]["eager"]["train"]
        assert r["grad_checkpointing"] is (checkpointing == "on") and r["tokens_per_s"] > 0
        assert len(calls) == runs, (checkpointing, len(calls))


def test_torch_peer_retries_out_of_memory_with_checkpointing(monkeypatch, torch_peer):
    import torch

    from smedjan.config import preset

    real, tried = torch_peer._train, []

    def train(*a):
        tried.append(a[-1])
        if not a[-1]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*a)

    monkeypatch.setattr(torch_peer, "_train", train)
    hf = preset("tiny", num_hidden_layers=1, vocab_size=64).to_hf_dict()
    kw = dict(iters=1, repeats=1, warmup=0, modes=("eager",), columns=("train",))
    out = torch_peer.run_peer(hf, 2, 8, **kw)
    assert tried == [False, True] and out["results"]["eager"]["train"]["grad_checkpointing"] is True
    with pytest.raises(torch.cuda.OutOfMemoryError):  # "off": the error is the answer
        torch_peer.run_peer(hf, 2, 8, grad_checkpointing="off", **kw)

"""Training checkpoints (smedjan.train.checkpointing): atomic, pruned, checksummed; a damaged newest one is
named in one line and resume falls back to the newest intact one (or refuses with --strict-resume)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from smedjan.cli import main
from smedjan.train import checkpointing as ck

STATE = {"a": jnp.arange(12.0).reshape(3, 4), "b": {"c": jnp.int32(5)}}


def _save(run, step, keep=10):
    return ck.save_checkpoint(run, jax.tree.map(lambda x: x + step, STATE), {"step": step}, keep=keep)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=2)
    assert [s for s, _ in ck.checkpoints(tmp_path)] == [2, 3]
    latest = ck.latest_checkpoint(tmp_path)
    assert sorted(p.name for p in latest.iterdir()) == ["manifest.json", "meta.json", "state"]
    # a crash mid-write leaves a .tmp folder: not a checkpoint, removed by the next save
    (tmp_path / "checkpoints" / "step_00000004.tmp" / "state").mkdir(parents=True)
    assert ck.latest_checkpoint(tmp_path) == latest
    restored, meta = ck.load_checkpoint(latest, STATE)
    assert meta["step"] == 3
    np.testing.assert_array_equal(restored["a"], STATE["a"] + 3)
    assert int(restored["b"]["c"]) == 8 and restored["b"]["c"].dtype == jnp.int32
    _save(tmp_path, 6, keep=2)
    assert not (tmp_path / "checkpoints" / "step_00000004.tmp").exists()
    assert [s for s, _ in ck.checkpoints(tmp_path)] == [3, 6]
    with pytest.raises(ck.CheckpointError, match=r"tensor zzz missing"):
        ck.load_checkpoint(latest, {"zzz": jnp.zeros(3)})
    with pytest.raises(ck.CheckpointError, match=r"a has shape \(3, 4\), the run expects \(4, 4\)"):
        ck.load_checkpoint(latest, {"a": jnp.zeros((4, 4)), "b": {"c": jnp.int32(0)}})


@pytest.mark.parametrize("device_copy", [False, True])
def test_writer_saves_in_the_background_and_resaves_a_step_once(tmp_path, device_copy):
    writer = ck.CheckpointWriter(tmp_path, keep=2, device_copy=device_copy)
    state = jax.tree.map(jnp.copy, STATE)
    path = writer.save(state, {"step": 7})
    # the next step donates the saved buffers: what is written was copied before save returned
    state = jax.jit(lambda t: jax.tree.map(lambda x: x * 0, t), donate_argnums=0)(state)
    assert writer.save(state, {"step": 7}) == path  # a stop right after a periodic save: not written twice
    writer.close()
    restored, _ = ck.load_checkpoint(path, STATE)
    np.testing.assert_array_equal(restored["a"], STATE["a"])


def _largest_data_file(ckpt):
    return max((p for p in (ckpt / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    return path


def _put(path, data: bytes):
    path.write_bytes(data)
    return path


def _truncate(path):
    return _put(path, path.read_bytes()[:-7])


def _gone(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return path


# name -> (damage(ckpt) -> the file the message must name, what the message says)
DAMAGE = {
    "truncated state file": (lambda c: _truncate(_largest_data_file(c)), "truncated"),
    "flipped byte": (lambda c: _flip(_largest_data_file(c)), "checksum mismatch"),
    "deleted state file": (lambda c: _gone(_largest_data_file(c)), "missing"),
    "missing state": (lambda c: _gone(c / "state").parent, "no state/ folder"),
    "missing meta": (lambda c: _gone(c / "meta.json"), "missing"),
    "meta without step": (lambda c: _put(c / "meta.json", b'{"seed": 0}'), "no integer 'step'"),
    "step of another folder": (lambda c: _put(c / "meta.json", b'{"step": 9}'), "step 9 but the folder"),
    "garbage meta": (lambda c: _put(c / "meta.json", b"\x00\xffnot json{"), "not valid JSON"),
    "meta is a list": (lambda c: _put(c / "meta.json", b"[2]"), "expected a JSON object"),
    "missing manifest": (lambda c: _gone(c / "manifest.json"), "missing"),
    "garbage manifest": (lambda c: _put(c / "manifest.json", b"{"), "not a valid manifest"),
    "manifest entry not an object": (
        lambda c: _put(c / "manifest.json", b'{"files": {"meta.json": 1}}'),
        "not a valid manifest",
    ),
    "manifest names a file outside": (
        lambda c: _put(c / "manifest.json", b'{"files": {"../x": {"sha256": "0", "bytes": 1}}}'),
        "not a valid manifest",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_in_one_line_and_resume_falls_back(tmp_path, damage):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    make, says = DAMAGE[damage]
    named = make(newest)
    with pytest.raises(ck.CheckpointError) as e:
        ck.check_checkpoint(newest)
    msg = str(e.value)
    assert "\n" not in msg and str(named) in msg and says in msg, msg
    heard = []
    state, meta, path = ck.restore_latest(tmp_path, STATE, say=heard.append)
    assert meta["step"] == 1 and path.name == "step_00000001"
    np.testing.assert_array_equal(state["a"], STATE["a"] + 1)
    assert len(heard) == 1 and str(named) in heard[0] and "skipping" in heard[0]
    with pytest.raises(ck.CheckpointError, match="strict-resume"):
        ck.restore_latest(tmp_path, STATE, strict=True)


def test_no_intact_checkpoint_at_all_is_an_error_not_a_fresh_start(tmp_path):
    _flip(_largest_data_file(_save(tmp_path, 1)))
    with pytest.raises(ck.CheckpointError, match="no intact checkpoint.*checksum mismatch"):
        ck.restore_latest(tmp_path, STATE, say=lambda m: None)
    assert ck.restore_latest(tmp_path / "empty", STATE) is None


def test_the_earlier_single_file_format_is_still_read(tmp_path):
    """Checkpoints written before orbax: one safetensors file of the gathered state, named by pytree path."""
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    leaves = jax.tree_util.tree_flatten_with_path(STATE)[0]
    save_file(
        {jax.tree_util.keystr(p): np.array(np.asarray(v) + 4) for p, v in leaves}, str(ckpt / "state.safetensors")
    )
    (ckpt / "meta.json").write_text(json.dumps({"step": 4}))
    state, meta, path = ck.restore_latest(tmp_path, STATE)
    assert meta["step"] == 4 and int(state["b"]["c"]) == 9
    (ckpt / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(ck.CheckpointError, match="state.safetensors: unreadable"):
        ck.load_checkpoint(ckpt, STATE)


# ---- through the CLI -------------------------------------------------------------------------------------
def _train(tmp_path, run, *extra):
    corpus = tmp_path / "c.txt"
    if not corpus.exists():
        corpus.write_text("\n".join(f"line {i}: the rain in spain stays mainly in the plain" for i in range(300)))
    args = ["train", "--corpus", str(corpus), "--tokenizer-vocab", "300", "--size", "tiny", "--dim", "32"]
    args += ["--layers", "1", "--heads", "2", "--ffn-dim", "64", "--batch-size", "4", "--seq-len", "16"]
    args += ["--precision", "fp32", "--steps", "6", "--save-every", "2", "--log-every", "1", "--eval-every", "0"]
    args += ["--eval-batches", "1", "--no-progress", "--no-export", "--out", str(run), *extra]
    return main(args)


def _losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(run / "log.jsonl")) if "loss" in r]


def test_cli_resume_falls_back_or_refuses_and_keeps_one_log_curve(tmp_path, capsys):
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert _train(tmp_path, straight) == 0
    assert _train(tmp_path, run, "--stop-after", "4") == 0
    assert [s for s, _ in ck.checkpoints(run)] == [2, 4]
    _flip(_largest_data_file(run / "checkpoints" / "step_00000004"))
    capsys.readouterr()
    assert _train(tmp_path, run, "--resume", "--strict-resume") == 1
    err = capsys.readouterr().err
    assert "step_00000004" in err and "checksum mismatch" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert _train(tmp_path, run, "--resume") == 0
    out, err = capsys.readouterr()
    assert "skipping a damaged checkpoint" in err and "step_00000004" in err
    assert "resumed from" in out and "step_00000002" in out
    assert _losses(run) == _losses(straight)  # steps 3, 4 re-run; their old records dropped

    # export-hf: a damaged checkpoint, or one whose meta lacks the model, gives one line naming the file
    newest = run / "checkpoints" / "step_00000006"
    _truncate(_largest_data_file(newest))
    assert main(["export-hf", str(run), "--output", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "truncated" in err and str(newest) in err and len(err.strip().splitlines()) == 1
    shutil.rmtree(newest)
    newest = run / "checkpoints" / "step_00000004"
    (newest / "meta.json").write_text('{"step": 4}')
    ck.write_manifest(newest)
    assert main(["export-hf", str(run), "--output", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "meta.json: no 'model_config'" in err and len(err.strip().splitlines()) == 1


def test_a_run_killed_in_its_first_checkpoint_restarts_with_one_log_curve(tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert _train(tmp_path, straight) == 0
    assert _train(tmp_path, run, "--save-every", "0", "--stop-after", "2") == 0  # a checkpoint at step 2 only
    # as if killed while writing that first checkpoint: only its temp folder and the log remain
    shutil.move(run / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000002.tmp")
    assert [s for s, _ in _losses(run)] == [1, 2]
    assert _train(tmp_path, run, "--resume") == 0
    assert _losses(run) == _losses(straight)

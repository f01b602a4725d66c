"""What a new user trips over first: each mistake is one clear line, before any slow work."""

import json
import os
import socket

import jax
import pytest

from smedjan.cli import main
from smedjan.config import preset


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    return err.strip()


def test_info_says_what_a_missing_path_is(capsys, tmp_path):
    err = _err(capsys, ["info", str(tmp_path / "missing" / "path")])
    assert "no such file or folder" in err and "unknown preset" not in err
    assert "no such file or folder" in _err(capsys, ["info", "nope/model"])
    assert "unknown preset 'nope'" in _err(capsys, ["info", "nope"])


def test_serve_refuses_a_bad_port_before_loading(capsys, tmp_path):
    err = _err(capsys, ["serve", str(tmp_path / "not-loaded"), "--port", "99999"])
    assert "--port 99999" in err and "not-loaded" not in err  # the port is checked first
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        err = _err(capsys, ["serve", str(tmp_path / "not-loaded"), "--port", str(busy)])
    assert f"cannot listen on 127.0.0.1:{busy}" in err


def test_served_model_name_defaults(tmp_path):
    from smedjan.serve.cli import served_model_name

    run_hf = tmp_path / "shakespeare" / "hf"
    run_hf.mkdir(parents=True)
    (run_hf / "config.json").write_text("{}")
    assert served_model_name(str(run_hf), run_hf) == "shakespeare"  # RUN/hf -> the run's name
    named = tmp_path / "mine"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": "org/base-model"}))
    assert served_model_name(str(named), named) == "org/base-model"
    (named / "config.json").write_text(json.dumps({"_name_or_path": "/abs/elsewhere"}))
    assert served_model_name(str(named), named) == "mine"
    assert served_model_name("org/hub-model", tmp_path / "cache" / "snapshot") == "org/hub-model"


def test_saved_weights_follow_the_umask(tmp_path):
    from smedjan.checkpoint import save_hf
    from smedjan.model.transformer import init_params

    cfg = preset("tiny", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=0, vocab_size=64)  # fmt: skip
    old = os.umask(0o027)
    try:
        out = save_hf(tmp_path / "hf", cfg, init_params(cfg, jax.random.key(0)))
    finally:
        os.umask(old)
    assert oct(os.stat(out / "model.safetensors").st_mode & 0o777) == oct(0o640)
    assert oct(os.stat(out / "config.json").st_mode & 0o777) == oct(0o640)


@pytest.mark.parametrize("flag", ["--steps", "--batch-size", "--seq-len", "--lr", "--keep"])
def test_train_refuses_nonsense_numbers_before_any_work(capsys, tmp_path, flag):
    out = tmp_path / "run"
    err = _err(capsys, ["train", "--corpus", "bundled", flag, "-3", "--out", str(out)])
    assert f"({flag}): must be > 0" in err
    assert not out.exists()


def test_a_relative_out_folder_trains_saves_and_resumes(tmp_path, monkeypatch, capsys):
    """The README's main job writes to runs/main_job: a relative --out must work end to end."""
    monkeypatch.chdir(tmp_path)
    from smedjan.data import prepare
    from smedjan.text import bundled_corpus
    from smedjan.tokenizer import train_tokenizer

    train_tokenizer([str(bundled_corpus())], "tok", vocab_size=300, progress=False)
    prepare([str(bundled_corpus())], "tok", "data", val_fraction=0.05, progress=False)
    argv = ["train", "--dataset", "data", "--tokenizer", "tok", "--size", "tiny", "--dim", "32", "--layers", "1",
            "--heads", "2", "--ffn-dim", "64", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1",
            "--no-progress", "--out", "runs/rel", "--steps", "3"]  # fmt: skip
    assert main([*argv, "--stop-after", "2"]) == 0
    assert main([*argv, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert (tmp_path / "runs" / "rel" / "hf" / "model.safetensors").is_file()

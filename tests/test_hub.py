"""Hub push/pull as real HTTP through huggingface_hub, against a loopback server (tests/hub_server.py)."""

from __future__ import annotations

import json

import huggingface_hub.constants
import jax
import pytest
from hub_server import Hub, ServerThread

from smedjan.checkpoint import CheckpointError, save_hf
from smedjan.cli import main
from smedjan.config import preset
from smedjan.hub import HubError, pull, push, render_model_card
from smedjan.model import init_params

RUN = {"step": 500, "data": "bundled", "train_loss": 3.71, "val_loss": 3.934, "val_perplexity": 51.1, "seq_len": 128}


@pytest.fixture()
def ckpt(tmp_path):
    cfg = preset("tiny", num_hidden_layers=1, vocab_size=256)
    folder = save_hf(tmp_path / "ckpt", cfg, init_params(cfg, jax.random.key(0)), run_info=RUN)
    (folder / "model-q8_0.gguf").write_bytes(b"GGUF" + bytes(60))
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"onnx-bytes")
    return folder


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest sets offline mode
    monkeypatch.setenv("HF_TOKEN", "hf_loopback")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    h = Hub()
    with ServerThread(h) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        h.url = server.url
        yield h


def test_model_card_carries_training_facts(ckpt):
    card = render_model_card(ckpt, "me/tiny")
    assert "library_name: transformers" in card
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny")' in card
    assert "| layers | 1 |" in card and "| vocabulary | 256 |" in card
    assert "| validation loss | 3.934 |" in card and "| steps trained | 500 |" in card
    assert "`model-q8_0.gguf`: GGUF" in card and "`onnx/model.onnx`" in card


def test_push_then_pull_over_http(hub, ckpt, tmp_path):
    url = push(ckpt, "me/tiny", private=True)
    repo = hub.repos["me/tiny"]
    assert url == f"{hub.url}/me/tiny/commit/{repo['sha']}" and repo["private"]
    assert set(repo["files"]) >= {
        "config.json",
        "model.safetensors",
        "smedjan_run.json",
        "README.md",
        "onnx/model.onnx",
    }
    assert repo["files"]["model.safetensors"] == (ckpt / "model.safetensors").read_bytes()
    assert b"| validation loss | 3.934 |" in repo["files"]["README.md"]
    assert not (ckpt / "README.md").exists()  # the card is uploaded, the user's folder left alone
    assert hub.requests[0] == ("POST", "/api/repos/create")

    out = pull("me/tiny", tmp_path / "pulled")
    for name in ("config.json", "model.safetensors", "model-q8_0.gguf", "onnx/model.onnx"):
        assert (out / name).read_bytes() == (ckpt / name).read_bytes(), name
    assert json.loads((out / "smedjan_run.json").read_text())["val_loss"] == 3.934

    assert push(ckpt, "me/tiny").endswith(repo["sha"])  # a second push to an existing repo


def test_refused_file_is_named(hub, ckpt, capsys):
    hub.reject["onnx/model.onnx"] = "file type not allowed"
    assert main(["push", str(ckpt), "me/tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert "uploading onnx/model.onnx" in err and "422" in err and "file type not allowed" in err
    assert len(err.splitlines()) == 1


def test_card_renders_before_anything_is_sent(hub, ckpt):
    (ckpt / "smedjan_run.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="smedjan_run.json: not valid JSON"):
        push(ckpt, "me/tiny")
    assert hub.requests == [] and hub.repos == {}


def test_unreachable_and_offline_are_one_line(monkeypatch, ckpt, tmp_path, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_loopback")
    assert main(["push", str(ckpt), "me/tiny", "--endpoint", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip()
    assert "could not reach http://127.0.0.1:9" in err and len(err.splitlines()) == 1
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["push", str(ckpt), "me/tiny"]) == 1
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in capsys.readouterr().err
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert main(["pull", "nobody/nothing", "--output", str(tmp_path / "o")]) == 1
    assert "could not pull 'nobody/nothing'" in capsys.readouterr().err


def test_push_refuses_non_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        push(tmp_path, "me/x")
    with pytest.raises(HubError, match="expected owner/name"):
        push(
            save_hf(
                tmp_path / "c",
                preset("tiny", num_hidden_layers=1),
                init_params(preset("tiny", num_hidden_layers=1), jax.random.key(0)),
            ),
            "x",
        )

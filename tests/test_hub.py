"""Hub push/pull: model card content and the calls made to huggingface_hub (no network)."""

from __future__ import annotations

import jax
import pytest

from smedjan.checkpoint import CheckpointError, save_hf
from smedjan.cli import main
from smedjan.config import preset
from smedjan.hub import push, render_model_card
from smedjan.model import init_params


class RecordingApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        return "https://huggingface.co/me/tiny/commit/abc"


@pytest.fixture()
def ckpt(tmp_path):
    cfg = preset("tiny", num_hidden_layers=1, vocab_size=256)
    return save_hf(tmp_path / "ckpt", cfg, init_params(cfg, jax.random.key(0)))


def test_model_card(ckpt):
    card = render_model_card(ckpt, "me/tiny")
    assert "library_name: transformers" in card
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny")' in card
    assert "| layers | 1 |" in card and "| vocabulary | 256 |" in card


def test_push_uploads_folder_with_card(ckpt):
    api = RecordingApi()
    assert push(ckpt, "me/tiny", private=True, api=api).endswith("abc")
    assert api.calls[0] == ("create_repo", "me/tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    upload = api.calls[1][1]
    assert upload["repo_id"] == "me/tiny" and upload["folder_path"] == str(ckpt)
    assert (ckpt / "README.md").read_text().startswith("---")


def test_push_refuses_non_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        push(tmp_path, "me/x", api=RecordingApi())


def test_pull_offline_is_a_clean_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert main(["pull", "nobody/nothing", "--output", str(tmp_path / "o")]) == 1
    assert "could not pull 'nobody/nothing'" in capsys.readouterr().err

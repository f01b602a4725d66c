"""Bad checkpoints fail with one clear error naming the file and tensor."""

from __future__ import annotations

import json

import pytest
from hf_utils import build_hf_model
from safetensors.numpy import load_file, save_file

from smedjan.checkpoint import CheckpointError, load_hf


@pytest.fixture()
def hf_dir(tmp_path):
    build_hf_model("llama", seed=1).save_pretrained(tmp_path)
    return tmp_path


def test_truncated_file(hf_dir):
    f = hf_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        load_hf(hf_dir)


def test_corrupt_header(hf_dir):
    f = hf_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!!\x00"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf(hf_dir)


def test_missing_tensor(hf_dir):
    f = hf_dir / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_hf(hf_dir)


def test_wrong_shape(hf_dir):
    f = hf_dir / "model.safetensors"
    tensors = load_file(f)
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:10]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*shape \(10,\)"):
        load_hf(hf_dir)


def test_unexpected_tensor(hf_dir):
    f = hf_dir / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.mlp.extra.weight"] = tensors["model.norm.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="does not account for"):
        load_hf(hf_dir)


def test_missing_shard_from_index(hf_dir):
    names = load_file(hf_dir / "model.safetensors")
    weight_map = {n: "model.safetensors" for n in names}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: file missing"):
        load_hf(hf_dir)


def test_unsupported_architecture(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json.*gpt_neox"):
        load_hf(hf_dir)


def test_not_a_folder_or_repo(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_hf(tmp_path / "nope")


def test_offline_hub_miss_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # a missing relative path of the form a/b could be either: the message says both
    with pytest.raises(CheckpointError, match="someone/missing-model: neither a local folder .* nor a hub repo id"):
        load_hf("someone/missing-model")

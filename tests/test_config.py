"""ModelConfig <-> HF config.json, presets, and clear errors for what smedjan cannot run."""

from __future__ import annotations

import json

import pytest
import transformers
from hf_utils import ARCHS, ROPES, build_hf_model, hf_config

from smedjan.cli import main
from smedjan.config import PRESETS, ConfigError, ModelConfig, preset


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("rope", list(ROPES))
def test_roundtrip_through_transformers(arch, rope):
    hf = hf_config(arch, rope).to_dict()
    cfg = ModelConfig.from_hf_dict(hf)
    again = ModelConfig.from_hf_dict(cfg.to_hf_dict())
    assert again == cfg
    # transformers reads what smedjan writes into an equivalent config
    back = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    assert ModelConfig.from_hf_dict(back.to_dict()) == cfg


def test_legacy_rope_scaling_spelling():
    d = hf_config("llama").to_dict()
    d.pop("rope_parameters")
    d["rope_theta"] = 500000.0
    d["rope_scaling"] = {"type": "linear", "factor": 4.0}
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_architecture_switches():
    q2 = ModelConfig.from_hf_dict(hf_config("qwen2").to_dict())
    assert q2.qkv_bias and not q2.o_bias and not q2.qk_norm
    q3 = ModelConfig.from_hf_dict(hf_config("qwen3").to_dict())
    assert q3.qk_norm and q3.head_dim == 32
    mi = ModelConfig.from_hf_dict(hf_config("mistral").to_dict())
    assert mi.sliding_window == 5


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("model_type", "gpt2", "model_type 'gpt2' is not supported"),
        ("some_new_knob", 3, "unsupported config field 'some_new_knob'"),
        ("hidden_act", "gelu", "hidden_act"),
        ("mlp_bias", True, "mlp_bias"),
        ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}, "longrope"),
        ("num_key_value_heads", 3, "multiple of"),
        ("quantization_config", {"quant_method": "gptq"}, "quantization_config"),
    ],
)
def test_unsupported_fields_are_named(field, value, match):
    d = hf_config("llama").to_dict()
    d[field] = value
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict(d)


def test_mixed_sliding_layers_rejected():
    d = hf_config("qwen2").to_dict()
    d.update(use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None)
    with pytest.raises(ConfigError, match="max_window_layers"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize(
    "name,approx",
    [
        ("tiny", 2e6),
        ("small", 7.2e6),
        ("medium", 45e6),
        ("125m", 125e6),
        ("350m", 350e6),
        ("1b", 1.0e9),
        ("3b", 3e9),
        ("6.5b", 6.5e9),
    ],
)
def test_presets_sizes(name, approx):
    n = preset(name).num_params()
    assert abs(n - approx) / approx < 0.1, (name, n)


def test_num_params_matches_transformers():
    model = build_hf_model("qwen3")
    cfg = ModelConfig.from_hf_dict(model.config.to_dict())
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_info_cli(capsys, tmp_path):
    assert main(["info", "small", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_params"] == preset("small").num_params()
    assert main(["info", "tiny", "--layers", "2", "--dim", "64", "--heads", "2"]) == 0
    assert "parameters:" in capsys.readouterr().out
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "bogus": 1}))
    assert main(["info", str(tmp_path)]) == 1
    assert "bogus" in capsys.readouterr().err
    assert main(["info", "no-such-preset"]) == 1
    assert set(PRESETS) >= {"tiny", "small", "medium", "125m", "350m", "1b", "3b", "6.5b"}

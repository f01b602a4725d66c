"""LoRA adapters: smedjan's forward vs peft's (both directions of the PEFT format), merge, dropout."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_utils import build_hf_model, hf_logits

from smedjan.checkpoint import CheckpointError, load_hf
from smedjan.model.lora import LoraConfig, attach, init_adapters, merge
from smedjan.model.transformer import forward, param_shapes
from smedjan.peft import load_adapter, save_adapter

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")


def _tokens(seed=0, b=2, s=12, vocab=211):
    return np.random.default_rng(seed).integers(0, vocab, (b, s)).astype(np.int32)


def _random_adapters(cfg, lcfg, seed=1):
    ad = init_adapters(param_shapes(cfg), lcfg, jax.random.key(seed))
    # B starts at zero (the base): give it values so the test can see the update
    return {
        k: (v if ".lora_A." in k else 0.05 * jax.random.normal(jax.random.key(seed + 1), v.shape))
        for k, v in ad.items()
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    model = build_hf_model("qwen2", seed=3)  # biases on q/k/v, tied head
    model.save_pretrained(d)
    cfg, params = load_hf(d)
    return d, model, cfg, params


@pytest.mark.parametrize("targets,rslora", [(None, False), ("q_proj,v_proj,down_proj", True)])
def test_smedjan_adapter_loads_in_peft_with_same_logits(tmp_path, base, targets, rslora):
    folder, model, cfg, params = base
    lcfg = LoraConfig(rank=4, alpha=8, targets=LoraConfig.parse_targets(targets), rslora=rslora)
    ad = _random_adapters(cfg, lcfg)
    out = save_adapter(tmp_path / "ad", ad, lcfg, base_model_name_or_path=str(folder))
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(folder) and conf["r"] == 4
    tokens = _tokens()
    ours = np.asarray(forward(attach(params, ad, lcfg), jnp.asarray(tokens), cfg))
    pm = peft.PeftModel.from_pretrained(build_hf_model("qwen2", seed=3), str(out)).eval()
    ref = hf_logits(pm, tokens)
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)
    assert np.abs(ref - hf_logits(model, tokens)).max() > 1e-3  # the adapter changed something
    # merged weights give the same logits as the adapter on top of the base
    merged = forward(merge(params, ad, lcfg), jnp.asarray(tokens), cfg)
    np.testing.assert_allclose(np.asarray(merged), ref, atol=2e-5, rtol=1e-4)


def test_transformers_loads_adapter_folder_by_itself(tmp_path, base):
    import transformers

    folder, _, cfg, params = base
    lcfg = LoraConfig(rank=2, alpha=4)
    ad = _random_adapters(cfg, lcfg)
    out = save_adapter(tmp_path / "ad", ad, lcfg, base_model_name_or_path=str(folder))
    m = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokens = _tokens(5)
    np.testing.assert_allclose(
        np.asarray(forward(attach(params, ad, lcfg), jnp.asarray(tokens), cfg)),
        hf_logits(m, tokens),
        atol=2e-5,
        rtol=1e-4,
    )


def test_reads_an_adapter_written_by_peft(tmp_path, base):
    folder, _, cfg, params = base
    pc = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"], layers_to_transform=[0, 2]
    )
    pm = peft.get_peft_model(build_hf_model("qwen2", seed=3), pc)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "p")
    ad, lcfg = load_adapter(tmp_path / "p", cfg)
    assert lcfg.targets == ("q_proj", "k_proj", "o_proj", "up_proj") and lcfg.scale == 4.0
    assert not np.asarray(ad["model.layers.self_attn.q_proj.lora_B.weight"][1]).any()  # layer 1 not adapted
    tokens = _tokens(7)
    ours = forward(attach(params, ad, lcfg), jnp.asarray(tokens), cfg)
    np.testing.assert_allclose(np.asarray(ours), hf_logits(pm.eval(), tokens), atol=2e-5, rtol=1e-4)
    # smedjan's merge == peft's merge_and_unload
    unloaded = pm.merge_and_unload()
    merged = merge(params, ad, lcfg)
    w = unloaded.model.layers[2].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(merged["model.layers.self_attn.q_proj.weight"][2]), w, atol=1e-6)


def test_bad_adapter_folders(tmp_path, base):
    folder, _, cfg, _ = base
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_adapter(tmp_path, cfg)
    lcfg = LoraConfig(rank=2)
    save_adapter(tmp_path / "a", _random_adapters(cfg, lcfg), lcfg)
    conf = json.loads((tmp_path / "a/adapter_config.json").read_text())
    (tmp_path / "a/adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora not supported"):
        load_adapter(tmp_path / "a", cfg)
    (tmp_path / "a/adapter_config.json").write_text(json.dumps(conf))
    other = cfg.__class__(**{**cfg.__dict__, "hidden_size": 32, "intermediate_size": 80, "head_dim": 8})
    with pytest.raises(CheckpointError, match="adapter for another model"):
        load_adapter(tmp_path / "a", other)


def test_dropout_is_inverted_and_keyed(base):
    _, _, cfg, params = base
    lcfg = LoraConfig(rank=4, alpha=8, dropout=0.5)
    ad = _random_adapters(cfg, lcfg)
    tokens = jnp.asarray(_tokens())
    plain = forward(attach(params, ad, lcfg), tokens, cfg)
    a = forward(attach(params, ad, lcfg, jax.random.key(0)), tokens, cfg)
    b = forward(attach(params, ad, lcfg, jax.random.key(0)), tokens, cfg)
    c = forward(attach(params, ad, lcfg, jax.random.key(1)), tokens, cfg)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4 and np.abs(np.asarray(a) - np.asarray(plain)).max() > 1e-4


def test_joined_projections_add_the_same_updates(base):
    from smedjan.backend import settings

    _, _, cfg, params = base
    lcfg = LoraConfig(rank=4, alpha=8)
    p = attach(params, _random_adapters(cfg, lcfg), lcfg)
    tokens = jnp.asarray(_tokens())
    apart = forward(p, tokens, cfg, backend=settings("cpu", fuse_projections=False))
    joined = forward(p, tokens, cfg, backend=settings("cpu", fuse_projections=True))
    np.testing.assert_allclose(np.asarray(joined), np.asarray(apart), atol=2e-5, rtol=1e-4)

"""Weight-only quantization: the quantized weight type, the model's linears running it (training
forward and the decode engine), the folder format, AWQ, and `smedjan quantize` end to end.

The reference for "runs it right" is the same model with each quantized weight dequantized back to
float: quantized and dequantized params must give the same logits and the same greedy tokens (the
quantization error itself is measured by the perplexity table in benchmarks/RESULTS.md).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import make_tiny_checkpoint

from smedjan.backend import settings
from smedjan.checkpoint import load_hf, save_hf
from smedjan.infer.cli import load_tokenizer
from smedjan.infer.runner import generate
from smedjan.model.transformer import forward
from smedjan.quant.awq import search_scale
from smedjan.quant.quantize import quantization_config, quantize_params
from smedjan.quant.qweight import QuantizedWeight, dequantize, is_quantized, join_outputs, qmatmul, quantize


def _dequantized(params):
    return {k: dequantize(v) if is_quantized(v) else v for k, v in params.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # untied head (quantizable), intermediate 160: not a multiple of the int4 group (padded)
    folder = tmp_path_factory.mktemp("q") / "tiny"
    cfg, params = make_tiny_checkpoint(folder, tie_word_embeddings=False)
    return folder, cfg, params


@pytest.mark.parametrize("scheme,bound", [("int8", 0.01), ("int4", 0.15)])
def test_quantize_round_trip_error(scheme, bound):
    w = jax.random.normal(jax.random.key(0), (3, 48, 100)) * 0.02  # [layers, out, in], in not a group multiple
    qw = quantize(w, scheme, 32)
    assert isinstance(qw, QuantizedWeight) and qw.in_features == 100
    back = dequantize(qw)
    assert back.shape == w.shape
    assert float(jnp.linalg.norm(back - w) / jnp.linalg.norm(w)) < bound
    x = jax.random.normal(jax.random.key(1), (2, 5, 100))
    layer1 = qw.map(lambda a: a[1])
    np.testing.assert_allclose(qmatmul(x, layer1), x @ back[1].T, rtol=1e-4, atol=1e-5)


def test_int4_codes_are_stored_two_per_byte():
    qw = quantize(jnp.ones((8, 64)), "int4", 64)
    assert qw.q.dtype == jnp.uint8 and qw.q.shape == (32, 8)
    assert qw.scales.shape == (1, 8) and qw.offsets.shape == (1, 8)


def test_join_outputs_matches_the_float_layout():
    # q/k/v of 2 kv heads, 2 query heads each, head dim 4: joined per kv head as the model joins floats
    ws = [jax.random.normal(jax.random.key(i), (n, 64)) for i, n in enumerate((16, 8, 8))]
    qs = [quantize(w, "int4", 32) for w in ws]
    joined = join_outputs(qs, (2, 4, 4), groups=2)
    x = jax.random.normal(jax.random.key(9), (3, 64))
    deq = [dequantize(q) for q in qs]
    want = jnp.concatenate([d.reshape(2, -1, 4, 64) for d in deq], axis=1)  # [Hkv, G + 2, hd, in]
    np.testing.assert_allclose(qmatmul(x, joined), jnp.einsum("mi,kghi->mkgh", x, want), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        join_outputs([qs[0], quantize(jnp.ones((8, 64)), "int8")], (2, 12), groups=2)
    # gate/up: one after the other
    gu = join_outputs(qs[1:], (2, 8))
    np.testing.assert_allclose(qmatmul(x, gu), jnp.stack([x @ d.T for d in deq[1:]], axis=1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_forward_and_generate_run_the_quantized_weights(tiny, scheme):
    folder, cfg, params = tiny
    q, cfg = quantize_params(params, cfg, scheme, group_size=32, lm_head=True)
    assert is_quantized(q["model.layers.self_attn.q_proj.weight"]) and is_quantized(q["lm_head.weight"])
    deq = _dequantized(q)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11)), jnp.int32)
    want = forward(deq, tokens, cfg)
    np.testing.assert_allclose(forward(q, tokens, cfg), want, rtol=2e-4, atol=2e-4)
    # the GPU layout: q/k/v and gate/up joined into one quantized weight each
    fused = settings().replace(fuse_projections=True)
    np.testing.assert_allclose(forward(q, tokens, cfg, backend=fused), want, rtol=2e-4, atol=2e-4)
    # the decode engine (prefill + decode loop over its own joined weights), greedy
    prompts = [[1, 5, 9, 13], [7, 3]]
    assert generate(q, cfg, prompts, max_new_tokens=6) == generate(deq, cfg, prompts, max_new_tokens=6)


def test_folder_round_trip_and_transformers_refuses(tiny, tmp_path):
    folder, cfg, params = tiny
    q, cfg = quantize_params(params, cfg, "int4", group_size=32)
    out = save_hf(tmp_path / "q4", cfg, q, quantization_config=quantization_config("int4", 32, "rtn", False))
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["quantization_config"]["quant_method"] == "smedjan"
    cfg2, loaded = load_hf(out)
    assert cfg2 == cfg
    for name, v in q.items():
        if is_quantized(v):
            assert loaded[name].bits == 4 and loaded[name].group_size == 32
            for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(loaded[name])):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    from transformers import AutoModelForCausalLM

    # transformers does not know quant_method "smedjan": it must refuse the folder, not load random weights
    assert not (out / "model.safetensors").exists() and (out / "quantized.safetensors").exists()
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out)


def test_awq_scale_beats_rtn_on_outlier_channels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 128)).astype(np.float32)
    x[:, :4] *= 30.0  # a few loud input channels, as in real activations
    w = jnp.asarray(rng.normal(size=(64, 128)).astype(np.float32) * 0.05)

    def err(in_scale):
        wq = dequantize(quantize(w, "int4", 64, in_scale=in_scale))
        return float(jnp.sum(jnp.square(x @ (w - wq).T)))

    in_scale, alpha = search_scale(x, [w], "int4", 64)
    assert alpha > 0 and err(in_scale) < 0.8 * err(None)


def test_quantize_cli_awq_then_generate(tiny, tmp_path, capsys):
    from smedjan.cli import main

    folder, cfg, params = tiny
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog near the river bank. " * 40)
    out = tmp_path / "tiny-awq"
    args = ["quantize", str(folder), "--scheme", "int4", "--group-size", "32", "--method", "awq"]
    assert main([*args, "--calib", str(calib), "--calib-rows", "2", "--calib-seq-len", "32", "--out", str(out)]) == 0
    _, loaded = load_hf(out)
    w = loaded["model.layers.self_attn.q_proj.weight"]
    assert w.in_scale is not None and w.in_scale.shape == (cfg.num_hidden_layers, cfg.hidden_size)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "The quick", "--max-new-tokens", "5"]) == 0
    tok = load_tokenizer(out)
    want = generate(_dequantized(loaded), cfg, [tok.encode_prompt("The quick")], max_new_tokens=5)[0]
    assert capsys.readouterr().out.startswith(tok.decode(want, skip_special_tokens=True)[:3])
    # bad input: one line, no traceback
    assert main(["quantize", str(folder), "--scheme", "int4", "--method", "awq", "--out", str(tmp_path / "x")]) == 1
    assert "needs calibration text" in capsys.readouterr().err

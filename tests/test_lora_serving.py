"""Several LoRA adapters served unmerged beside the base, in one batch: each request's greedy output equals
the merged model's."""

from __future__ import annotations

import jax
import numpy as np

from smedjan.config import preset
from smedjan.infer import generate
from smedjan.infer.sampling import SamplingParams
from smedjan.model.lora import LoraConfig, init_adapters, merge
from smedjan.model.transformer import init_params, param_shapes
from smedjan.serve.engine import Engine


def _setup():
    cfg = preset(
        "tiny",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
        max_position_embeddings=128,
    )
    params = {k: v * 4.0 if v.ndim >= 2 else v for k, v in init_params(cfg, jax.random.key(0)).items()}
    adapters = {}
    for i, lcfg in enumerate(
        [LoraConfig(rank=4, alpha=8), LoraConfig(rank=8, alpha=4, targets=("q_proj", "down_proj"))]
    ):
        ad = init_adapters(param_shapes(cfg), lcfg, jax.random.key(10 + i))
        # B is zero at init: make the updates real
        ad = {
            k: v if ".lora_A." in k else 0.5 * jax.random.normal(jax.random.key(20 + i), v.shape) for k, v in ad.items()
        }
        adapters[f"ad{i}"] = (ad, lcfg)
    return cfg, params, adapters


def test_engine_batches_base_and_adapters_like_merged_models():
    cfg, params, adapters = _setup()
    prompts = [[3, 9, 27, 3], [5, 6, 7], [1, 2, 3, 4, 5], [8, 8]]
    names = [None, "ad0", "ad1", "ad0"]
    want = []
    for p, n in zip(prompts, names):
        merged = params if n is None else merge(params, *adapters[n])
        want.append(generate(merged, cfg, [p], max_new_tokens=10)[0])
    assert want[1] != generate(params, cfg, [prompts[1]], max_new_tokens=10)[0]  # the adapter matters
    with Engine(params, cfg, max_batch=4, max_seq_len=64, adapters=adapters) as engine:
        reqs = [engine.submit(p, SamplingParams(max_new_tokens=10), adapter=n) for p, n in zip(prompts, names)]
        assert [r.result()[0] for r in reqs] == want
    # generate(lora=...) applies one adapter unmerged
    assert generate(params, cfg, [prompts[2]], max_new_tokens=10, lora=adapters["ad1"]) == [want[2]]


def test_unknown_adapter_is_refused():
    cfg, params, adapters = _setup()
    with Engine(params, cfg, max_batch=2, max_seq_len=32, adapters=adapters) as engine:
        try:
            engine.submit([1, 2], SamplingParams(max_new_tokens=2), adapter="nope")
        except ValueError as e:
            assert e.args[0] == "model" and "nope" in e.args[1]
        else:
            raise AssertionError("an unknown adapter was accepted")
        assert np.array_equal(
            engine.generate([1, 2], SamplingParams(max_new_tokens=3)),
            engine.generate([1, 2], SamplingParams(max_new_tokens=3)),
        )

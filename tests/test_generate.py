"""Generation engine: parity with transformers' greedy generate, sampling controls, stops, CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smedjan.config import ModelConfig
from smedjan.infer.cli import load_tokenizer
from smedjan.infer.runner import generate
from smedjan.infer.sampling import penalize, sample
from smedjan.infer.stream import TextStream

TOKENIZER_TEXT = [
    "Once upon a time there was a little robot who liked to build things.",
    "The smith hammered the hot iron on the anvil, and sparks flew everywhere.",
    "Hello, how are you today? I am fine, thank you very much!",
    "Language models predict the next token from the previous tokens.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
] * 20
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer_dir(folder, vocab_size: int = 300):
    """A tiny byte-level BPE trained on the spot, with tokenizer_config.json (chat template, bos/eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE})
    )
    return tok


def make_tiny_checkpoint(folder, seed: int = 0, **overrides):
    """A random tiny llama + BPE tokenizer saved as a HF folder; returns (cfg, params)."""
    from smedjan.checkpoint import save_hf
    from smedjan.model.transformer import init_params

    tokdir = folder.parent / (folder.name + "-tok")
    tok = make_tokenizer_dir(tokdir)
    kw = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=[tok.token_to_id("</s>"), tok.token_to_id("<|im_end|>")],
        tie_word_embeddings=True,
    )
    kw.update(overrides)
    cfg = ModelConfig(**kw)
    params = init_params(cfg, jax.random.key(seed))
    # Larger weights than the init's 0.02 give peaked, tie-free logits (robust greedy comparisons).
    params = {k: v * 6.0 if v.ndim >= 2 else v for k, v in params.items()}
    save_hf(folder, cfg, params, tokenizer_dir=tokdir, dtype=jnp.float32)
    return cfg, params


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    from hf_utils import build_hf_model

    from smedjan.checkpoint import load_hf

    model = build_hf_model("llama")
    folder = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(folder)
    cfg, params = load_hf(folder)
    return model, cfg, params


def test_greedy_matches_transformers(hf_llama):
    import torch

    model, cfg, params = hf_llama
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(0, cfg.vocab_size, size=n))) for n in (7, 12)]
    ours, our_lps = generate(params, cfg, prompts, max_new_tokens=32, return_logprobs=True)
    for p, o, lps in zip(prompts, ours, our_lps):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([p]),
                do_sample=False,
                max_new_tokens=32,
                min_new_tokens=32,
                eos_token_id=None,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
        ref_ids = ref.sequences[0, len(p) :].tolist()
        assert o == ref_ids
        ref_lps = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(ref.logits, ref_ids)]
        np.testing.assert_allclose(lps, ref_lps, atol=2e-4)


def test_sampling_controls(hf_llama):
    _, cfg, params = hf_llama
    prompts = [[5, 17, 42, 9], [100, 3]]
    greedy = generate(params, cfg, prompts, max_new_tokens=12)
    # Filters that leave one candidate reduce sampling to greedy.
    assert generate(params, cfg, prompts, max_new_tokens=12, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(params, cfg, prompts, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3) == greedy
    assert generate(params, cfg, prompts, max_new_tokens=12, temperature=1.0, min_p=1.0, seed=3) == greedy
    a = generate(params, cfg, prompts, max_new_tokens=12, temperature=1.5, seed=1)
    assert a == generate(params, cfg, prompts, max_new_tokens=12, temperature=1.5, seed=1)  # reproducible
    assert a != generate(params, cfg, prompts, max_new_tokens=12, temperature=1.5, seed=2)
    assert a != greedy
    # Stop tokens end a row early; the stop token itself is not returned.
    stop = greedy[0][3]
    cut = generate(params, cfg, prompts, max_new_tokens=12, eos_id=stop)
    assert cut[0] == greedy[0][: greedy[0].index(stop)]


def test_top_k_top_p_restrict_support():
    v = 50
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, v)) * 3, jnp.float32)
    order = np.argsort(-np.asarray(logits[0]))
    zeros = jnp.zeros((1, v), jnp.int32)
    pm = jnp.zeros((1, v), jnp.bool_)
    seen_k, seen_p = set(), set()
    sample_fn = jax.jit(sample, static_argnums=5)
    probs = np.exp(np.asarray(jax.nn.log_softmax(logits[0])))
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1])
    for pos in range(200):
        samp = {
            "temperature": jnp.ones(1),
            "top_k": jnp.asarray([3], jnp.int32),
            "top_p": jnp.ones(1),
            "min_p": jnp.zeros(1),
            "repetition_penalty": jnp.ones(1),
            "presence_penalty": jnp.zeros(1),
            "frequency_penalty": jnp.zeros(1),
            "seed": jnp.asarray([7], jnp.uint32),
        }
        seen_k.add(int(sample_fn(logits, samp, zeros, pm, jnp.asarray([pos]), 0)["tok"][0]))
        samp = dict(samp, top_k=jnp.zeros(1, jnp.int32), top_p=jnp.asarray([0.5]))
        seen_p.add(int(sample_fn(logits, samp, zeros, pm, jnp.asarray([pos]), 0)["tok"][0]))
    assert seen_k == set(order[:3])
    assert seen_p == nucleus


def test_repetition_penalty_matches_transformers():
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 40)).astype(np.float32)
    ids = np.array([[1, 5, 5, 9], [0, 2, 39, 3]])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(ids), torch.tensor(logits)).numpy()
    pm = np.zeros((2, 40), bool)
    pm[np.arange(2)[:, None], ids] = True
    samp = {"repetition_penalty": jnp.full(2, 1.3), "presence_penalty": jnp.zeros(2), "frequency_penalty": jnp.zeros(2)}
    ours = penalize(jnp.asarray(logits), samp, jnp.zeros((2, 40), jnp.int32), jnp.asarray(pm))
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-6)


def test_text_stream_holds_back_stop_strings(tmp_path):
    make_tokenizer_dir(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    ids = tok.encode("Hello, how are you today? I am fine", add_bos=False)
    s = TextStream(tok, stops=["you tomorrow"])
    pieces = [s.add(i) for i in ids] + [s.flush()]
    assert "".join(pieces) == "Hello, how are you today? I am fine"
    s = TextStream(tok, stops=["are you"])
    pieces = []
    for i in ids:
        pieces.append(s.add(i))
        if s.stopped:
            break
    assert s.stopped and "".join(pieces) == "Hello, how "


def test_generate_cli(tmp_path, capsys):
    from smedjan.cli import main

    folder = tmp_path / "tiny"
    cfg, params = make_tiny_checkpoint(folder)
    tok = load_tokenizer(folder)
    assert main(["generate", str(folder), "--prompt", "Once upon a time", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    stops = [i for i in cfg.eos_token_id]
    want = generate(params, cfg, [tok.encode_prompt("Once upon a time")], max_new_tokens=8, eos_id=stops)[0]
    assert printed == tok.decode(want, skip_special_tokens=True) + "\n"
    assert (
        main(
            [
                "generate",
                str(folder),
                "--prompt",
                "Hi",
                "--max-new-tokens",
                "4",
                "--temperature",
                "0.9",
                "--top-k",
                "20",
                "--top-p",
                "0.9",
                "--seed",
                "3",
                "--chat",
            ]
        )
        == 0
    )
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 1


def test_backend_settings_resolve_per_platform():
    from smedjan.backend import settings

    cpu = settings("cpu")
    assert (cpu.decode_impl, cpu.attn_impl, cpu.fuse_projections, cpu.interpret) == ("xla", "xla", False, True)
    assert settings("cpu", decode_impl="pallas").decode_impl == "pallas"
    assert settings("cpu", decode_impl="auto") == cpu
    with pytest.raises(ValueError):
        settings("cpu", decode_impl="flash")
    gpu = settings("gpu")
    assert gpu.decode_impl == "pallas_fused" and gpu.fuse_projections and not gpu.interpret  # the H100-measured fastest
    hash(gpu)  # static to jit


@pytest.mark.parametrize(
    "rows_kw",
    [
        [dict(), dict()],  # all greedy: the loop is specialised to argmax
        [dict(temperature=1.2, top_k=20), dict(repetition_penalty=1.3, presence_penalty=0.5)],
    ],
)
def test_decode_loop_chunks_and_static_sampling_equal_one_step_at_a_time(hf_llama, rows_kw):
    """The chunked early-exit loop, specialised to the rows' sampling, gives exactly what one step
    at a time with on-device sampling decisions gives: tokens, logprobs, steps, final positions."""
    from smedjan.backend import settings
    from smedjan.infer import runner as gen
    from smedjan.infer.sampling import SamplingParams, sampling_mode

    _, cfg, params = hf_llama
    prompts = [[5, 17, 42, 9], [100, 3, 8]]
    rows = [SamplingParams(max_new_tokens=16, seed=i, **kw).row(i) for i, kw in enumerate(rows_kw)]
    n_steps = 13  # not a multiple of the chunk

    def run(chunk, sampling, stop_ids):
        runner = gen.Runner(params, cfg, 2, 64, backend=settings("cpu", decode_chunk=chunk))
        first = runner.prefill([0, 1], prompts, rows)
        toks, lps, _, steps = runner.loop(first, np.ones(2, bool), stop_ids, n_steps, 64, sampling=sampling)
        return np.asarray(toks), np.asarray(lps), int(steps), np.asarray(runner.state["pos"])

    ref = run(1, None, [-1])
    stop = int(ref[0][0, 5])  # row 0 stops at its 5th new token, inside a chunk of 4 and of 16
    ref_stop = run(1, None, [stop])
    assert ref_stop[0][0, 6] == -1 and ref_stop[2] > 5
    mode = sampling_mode(rows)
    for chunk in (4, 16):
        for want, stop_ids in ((ref, [-1]), (ref_stop, [stop])):
            got = run(chunk, mode, stop_ids)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-6)
            assert got[2:3] == want[2:3]
            np.testing.assert_array_equal(got[3], want[3])

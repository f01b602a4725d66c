"""`smedjan train`: fused cross-entropy, optimizer, real-corpus training, exact resume, checkpoints, export."""

import json
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smedjan.cli import main
from smedjan.config import preset
from smedjan.data import prepare
from smedjan.runconfig import OptimConfig, ScheduleConfig
from smedjan.text import bundled_corpus
from smedjan.tokenizer import train_tokenizer
from smedjan.train import checkpointing as ck
from smedjan.train.loader import WindowSampler, eval_batches
from smedjan.train.loss import chunked_cross_entropy, naive_cross_entropy
from smedjan.train.step import decay_mask, init_train_state, make_optimizer, make_schedule, make_train_step

# One tiny shape for every CLI run here, so the jitted steps are shared between tests.
TINY = [
    "--size",
    "tiny",
    "--dim",
    "64",
    "--layers",
    "2",
    "--heads",
    "4",
    "--ffn-dim",
    "128",
    "--seq-len",
    "32",
    "--batch-size",
    "8",
    "--precision",
    "fp32",
    "--no-progress",
    "--eval-batches",
    "2",
    "--loss-chunk",
    "128",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Tokenizer + prepared dataset of the bundled Shakespeare corpus."""
    root = tmp_path_factory.mktemp("corpus")
    train_tokenizer([str(bundled_corpus())], root / "tok", vocab_size=512, progress=False)
    prepare([str(bundled_corpus())], root / "tok", root / "data", val_fraction=0.05, progress=False)
    return root / "data", root / "tok"


def _log(run):
    return [json.loads(line) for line in open(run / "log.jsonl")]


def _saved_state(ckpt):
    """Every array of a checkpoint's train state as numpy, by path (orbax's own reader, no template)."""
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(ckpt / ck.STATE)
    return {
        jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)
    }


def _losses(run):
    return {r["step"]: r["loss"] for r in _log(run) if "loss" in r}


# ---- loss ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_cross_entropy_equals_naive(chunk):
    k = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k[0], (3, 21, 32))
    weight = 0.3 * jax.random.normal(k[1], (97, 32))
    targets = jax.random.randint(k[2], (3, 21), 0, 97).at[0, :4].set(-1)  # some ignored positions

    def f(fn):
        def loss(h, w):
            s, n = fn(h, w, targets)
            return s / n

        return loss

    chunked = f(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk_size=chunk))
    naive = f(naive_cross_entropy)
    s, n = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk)
    assert int(n) == 3 * 21 - 4
    # independent reference: log-softmax over explicit logits in numpy
    logits = np.einsum("bsd,vd->bsv", np.asarray(hidden, np.float64), np.asarray(weight, np.float64))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    t = np.asarray(targets)
    ref = -sum(logp[b, i, t[b, i]] for b in range(3) for i in range(21) if t[b, i] >= 0)
    np.testing.assert_allclose(float(s), ref, rtol=1e-5)
    np.testing.assert_allclose(float(chunked(hidden, weight)), float(naive(hidden, weight)), rtol=1e-6)
    g1 = jax.grad(chunked, argnums=(0, 1))(hidden, weight)
    g2 = jax.grad(naive, argnums=(0, 1))(hidden, weight)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # bf16 hidden states (bf16 compute) still give float32 loss close to the fp32 one
    sb, _ = chunked_cross_entropy(hidden.astype(jnp.bfloat16), weight, targets, chunk_size=chunk)
    assert sb.dtype == jnp.float32
    np.testing.assert_allclose(float(sb), float(s), rtol=2e-2)
    # ... and its gradients (bf16 dlogits, bf16 matmuls) stay close to the fp32 ones, in each input's dtype
    gh, gw = jax.grad(chunked, argnums=(0, 1))(hidden.astype(jnp.bfloat16), weight)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
    for a, b in zip((gh, gw), g2):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.abs(a - b).max() <= 3e-2 * np.abs(b).max()


# ---- optimizer -------------------------------------------------------------------------------------------
def test_schedules_and_weight_decay_mask():
    cos = make_schedule(OptimConfig(lr=1.0), ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1), 100)
    assert float(cos(0)) == 0.0 and abs(float(cos(10)) - 1.0) < 1e-6
    assert abs(float(cos(100)) - 0.1) < 1e-6 and 0.1 < float(cos(55)) < 1.0
    wsd = make_schedule(
        OptimConfig(lr=1.0), ScheduleConfig(kind="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0), 100
    )
    assert abs(float(wsd(10)) - 1.0) < 1e-6 and abs(float(wsd(79)) - 1.0) < 1e-6
    assert abs(float(wsd(90)) - 0.5) < 1e-6 and float(wsd(100)) < 1e-6
    mask = decay_mask(
        {
            k: None
            for k in [
                "model.embed_tokens.weight",
                "model.norm.weight",
                "model.layers.input_layernorm.weight",
                "model.layers.self_attn.q_proj.bias",
                "model.layers.self_attn.q_norm.weight",
                "model.layers.mlp.up_proj.weight",
                "model.layers.self_attn.o_proj.weight",
                "lm_head.weight",
            ]
        }
    )
    assert [k for k, v in mask.items() if v] == [
        "model.layers.mlp.up_proj.weight",
        "model.layers.self_attn.o_proj.weight",
        "lm_head.weight",
    ]


def test_weight_decay_skips_norms_and_embeddings():
    """With zero gradients only decayed tensors move."""
    opt = make_optimizer(OptimConfig(lr=0.1, weight_decay=0.5, clip_norm=0), ScheduleConfig(warmup_steps=0), 10)
    params = {
        "model.norm.weight": jnp.ones(4),
        "model.embed_tokens.weight": jnp.ones((3, 4)),
        "model.layers.mlp.up_proj.weight": jnp.ones((1, 3, 4)),
    }
    state = opt.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    upd, _ = opt.update(zeros, state, params)
    assert float(jnp.abs(upd["model.norm.weight"]).max()) == 0.0
    assert float(jnp.abs(upd["model.embed_tokens.weight"]).max()) == 0.0
    assert float(upd["model.layers.mlp.up_proj.weight"].max()) < 0.0


def test_grad_accumulation_equals_one_big_batch():
    cfg = preset(
        "tiny",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=0,
        vocab_size=64,
    )
    opt = make_optimizer(OptimConfig(lr=1e-2), ScheduleConfig(warmup_steps=0), 10)
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, 64)
    results = []
    for accum in (1, 2):
        state = init_train_state(cfg, jax.random.key(0), opt)
        step = make_train_step(cfg, opt, compute_dtype=None, grad_accum=accum, loss_chunk=16, donate=False)
        state, m = step(state, {"tokens": tokens})
        results.append((float(m["loss"]), float(m["grad_norm"]), state.params))
    assert abs(results[0][0] - results[1][0]) < 1e-5
    assert abs(results[0][1] - results[1][1]) < 1e-4 * results[0][1]
    for k in results[0][2]:
        np.testing.assert_allclose(results[0][2][k], results[1][2][k], atol=2e-5)  # Adam amplifies tiny grads


def test_bf16_compute_and_remat_track_fp32():
    """bf16 compute over fp32 master weights (and full remat) gives the fp32 loss within bf16 error."""
    cfg = preset(
        "tiny",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=0,
        vocab_size=64,
    )
    opt = make_optimizer(OptimConfig(lr=1e-2), ScheduleConfig(warmup_steps=0), 10)
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, 64)
    ref_state = init_train_state(cfg, jax.random.key(0), opt)
    ref = make_train_step(cfg, opt, compute_dtype=None, loss_chunk=16, donate=False)
    _, m32 = ref(ref_state, {"tokens": tokens})
    state = init_train_state(cfg, jax.random.key(0), opt)
    step = make_train_step(cfg, opt, compute_dtype=jnp.bfloat16, remat="full", loss_chunk=16, donate=False)
    new_state, m16 = step(state, {"tokens": tokens})
    assert new_state.params["model.layers.mlp.up_proj.weight"].dtype == jnp.float32  # master weights stay fp32
    assert int(new_state.step) == 1
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 2e-2
    assert abs(float(m16["grad_norm"]) - float(m32["grad_norm"])) < 5e-2 * float(m32["grad_norm"])


# ---- data sampler ----------------------------------------------------------------------------------------
def test_window_sampler_is_a_pure_function_of_the_counter(tmp_path):
    arr = np.arange(10_000, dtype=np.uint16)
    arr.tofile(tmp_path / "t.bin")
    mm = np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r")
    a, b = WindowSampler(arr, 4, 16, seed=3), WindowSampler(mm, 4, 16, seed=3)
    np.testing.assert_array_equal(a.batch(7), b.batch(7))
    assert a.batch(7).shape == (4, 17) and a.batch(7).dtype == np.int32
    assert not np.array_equal(a.batch(7), a.batch(8))
    assert not np.array_equal(a.batch(7), WindowSampler(arr, 4, 16, seed=4).batch(7))
    np.testing.assert_array_equal(np.diff(a.batch(2), axis=1), 1)  # contiguous windows
    val = eval_batches(arr[:1000], 4, 16)
    counted = sum(int((b["targets"] >= 0).sum()) for b in val)
    assert counted == 999  # every next-token target exactly once


# ---- end-to-end ------------------------------------------------------------------------------------------
def _train_args(data, tok, run, *extra):
    return [
        "train",
        "--dataset",
        str(data),
        "--tokenizer",
        str(tok),
        *TINY,
        "--steps",
        "60",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "5",
        "--log-every",
        "1",
        "--eval-every",
        "30",
        "--save-every",
        "20",
        "--out",
        str(run),
        *extra,
    ]


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory):
    """60 uninterrupted steps on Shakespeare (shared by the tests below: one compilation)."""
    import contextlib
    import io

    data, tok = corpus
    run = tmp_path_factory.mktemp("straight") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(_train_args(data, tok, run, "--samples", "1", "--sample-tokens", "8"))
    assert rc == 0
    return run, buf.getvalue()


def test_loss_decreases_on_real_text_and_exports_hf(tmp_path, straight_run):
    run, out = straight_run
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 61))
    first, last = np.mean([losses[i] for i in range(1, 4)]), np.mean([losses[i] for i in range(56, 61)])
    assert first > 6.0  # ~ln(512) at init
    assert last < first - 0.8, (first, last)
    vals = [r for r in _log(run) if "val_loss" in r]
    assert [r["step"] for r in vals] == [30, 60]
    assert vals[1]["val_loss"] < vals[0]["val_loss"] < math.log(512) - 0.5
    assert abs(vals[1]["val_ppl"] - math.exp(vals[1]["val_loss"])) < 1e-6 * vals[1]["val_ppl"]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in _log(run) if "loss" in r)
    assert "val loss" in out and "--- sample ---" in out

    # the HF folder loads in transformers and computes what smedjan computes
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smedjan.checkpoint import load_hf
    from smedjan.model.transformer import forward
    from smedjan.tokenizer import Tokenizer

    hf_dir = run / "hf"
    cfg, params = load_hf(hf_dir, dtype=jnp.float32)
    assert cfg.vocab_size == 512 and cfg.hidden_size == 64 and cfg.bos_token_id == 1 and cfg.eos_token_id == 2
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    text = "ROMEO:\nWhat light through yonder window breaks?"
    ids = Tokenizer.from_dir(hf_dir).encode(text, add_bos=True)
    assert hf_tok(text)["input_ids"] == ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(forward(params, jnp.asarray([ids]), cfg))
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=2e-4)

    # export-hf from the run folder (fp32) equals the trained master weights
    assert main(["export-hf", str(run), "--output", str(tmp_path / "exp"), "--dtype", "fp32"]) == 0
    _, exported = load_hf(tmp_path / "exp")
    names = ("model.norm.weight", "model.layers.mlp.down_proj.weight")
    saved = ck.load_params(ck.latest_checkpoint(run), {n: exported[n].shape for n in names})
    for name in names:
        np.testing.assert_array_equal(np.asarray(exported[name]), saved[name])
    assert (tmp_path / "exp" / "tokenizer.json").is_file()
    # both folders record the run for the model card: the same facts, the last val loss logged
    record = json.loads((hf_dir / "smedjan_run.json").read_text())
    assert record == json.loads((tmp_path / "exp" / "smedjan_run.json").read_text())
    assert record["step"] == 60 and record["val_loss"] == round(vals[1]["val_loss"], 4) and "train_loss" in record


def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus, straight_run, capsys):
    data, tok = corpus
    straight, _ = straight_run
    split = tmp_path / "split"
    assert main(_train_args(data, tok, split, "--no-export", "--stop-after", "30", "--peak-flops", "1e12")) == 0
    assert "--resume" in capsys.readouterr().out
    assert all(0 < r["mfu"] < 1 for r in _log(split) if "loss" in r)  # MFU against the given peak
    assert ck.latest_checkpoint(split).name == "step_00000030"
    assert ck.read_meta(ck.latest_checkpoint(split))["data_position"] == 30
    # resume through np.memmap (--stream) reads the very same windows
    assert main(_train_args(data, tok, split, "--no-export", "--resume", "--stream")) == 0
    a, b = _losses(straight), _losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 61))
    for s in range(1, 61):
        assert abs(a[s] - b[s]) <= 1e-6 * abs(a[s]), (s, a[s], b[s])
    fa, fb = _saved_state(ck.latest_checkpoint(straight)), _saved_state(ck.latest_checkpoint(split))
    assert fa.keys() == fb.keys() and "step" in fa and int(fa["step"]) == 60
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # keep=3 (default): older checkpoints were pruned
    assert [s for s, _ in ck.checkpoints(straight)] == [20, 40, 60]


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path, corpus):
    data, tok = corpus
    run = tmp_path / "run"
    args = _train_args(data, tok, run, "--no-export")

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline:
            if (run / "log.jsonl").is_file() and (run / "log.jsonl").read_text().count("\n") >= 2:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.005)

    t = threading.Thread(target=killer)
    t.start()
    assert main(args) == 0
    t.join()
    stopped_at = ck.read_meta(ck.latest_checkpoint(run))["step"]
    assert 2 <= stopped_at < 60
    assert max(_losses(run)) == stopped_at
    # a crash after the checkpoint leaves log records past it: resume re-runs those steps, one curve remains
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": stopped_at + 1, "loss": 123.0}) + "\n" + '{"step": 9')
    assert main([*args, "--resume"]) == 0
    steps = [r["step"] for r in _log(run) if "loss" in r]
    assert steps == list(range(1, 61))
    assert 123.0 not in _losses(run).values()
    assert [s for s, _ in ck.checkpoints(run)][-1] == 60


def test_bad_options_give_clean_errors(tmp_path, corpus, capsys):
    data, tok = corpus
    base = [
        "train",
        "--dataset",
        str(data),
        "--tokenizer",
        str(tok),
        "--size",
        "tiny",
        "--steps",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main([*base, "--vocab-size", "256"]) == 1
    err = capsys.readouterr().err
    assert "tokenizer has 512 tokens" in err and "vocab_size is 256" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # a run that failed before its first checkpoint leaves no folder
    assert main([*base, "--seq-len", "4096"]) == 1
    assert "max_position_embeddings" in capsys.readouterr().err
    assert main([*base, "--batch-size", "6", "--grad-accum", "4"]) == 1
    assert "divide" in capsys.readouterr().err
    assert main([*base, "--mesh", "data=3"]) == 1
    assert "devices" in capsys.readouterr().err
    assert main([*base, "--steps", "-3"]) == 1
    assert "steps (--steps): must be > 0, got -3" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["train", "--size", "tiny"]) == 1
    assert "--dataset" in capsys.readouterr().err
    assert main(["export-hf", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 1
    assert "no checkpoints" in capsys.readouterr().err


def test_recipe_file_and_flags_layering(tmp_path):
    from smedjan import runconfig
    from smedjan.cli import build_parser

    recipe = tmp_path / "r.json"
    recipe.write_text(
        json.dumps({"corpus": "bundled", "size": "small", "dim": 96, "steps": 50, "lr": 1e-3, "_comment": "ignored"})
    )
    args = build_parser().parse_args(["train", "--recipe", str(recipe), "--steps", "7", "--layers", "3"])
    rc = runconfig.from_args(args)
    assert rc.steps == 7 and rc.optim.lr == 1e-3 and rc.model.size == "small"
    assert rc.model.overrides == {"hidden_size": 96, "num_hidden_layers": 3, "head_dim": 0}
    assert rc.data.corpus == ("bundled",)
    assert rc.schedule.warmup_steps == runconfig.ScheduleConfig().warmup_steps  # untouched: the default
    main_job = os.path.join(os.path.dirname(__file__), "..", "configs", "main_job.json")
    rc = runconfig.from_args(build_parser().parse_args(["train", "--recipe", main_job]))
    assert rc.data.corpus == ("bundled",) and rc.data.tokenizer_vocab == 2048 and rc.steps == 500


def test_speed_knobs_resolve_per_backend(monkeypatch):
    from smedjan.config import preset
    from smedjan.train.step import speed_knobs

    cfg = preset("125m")
    assert speed_knobs(cfg) == ("none", 1024, 1)  # CPU
    assert speed_knobs(cfg, "full", 512, 2) == ("full", 512, 2)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert speed_knobs(cfg) == ("dots", 16384, True)  # the H100-measured setting
    big_vocab = cfg.replace(vocab_size=128256)
    remat, chunk, _ = speed_knobs(big_vocab)
    assert chunk * big_vocab.vocab_size * 4 <= 2**31 and chunk == 4096

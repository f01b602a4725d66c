"""Fine-tuning: packing = unpacked, DPO = TRL's formula, distillation chunks = whole logits, non-finite
steps skipped, and the sft / dpo / distill / merge commands end to end on a tiny checkpoint."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smedjan.checkpoint import load_hf, save_hf
from smedjan.cli import main
from smedjan.config import ModelConfig
from smedjan.data.chat import ChatEncoder, pack
from smedjan.model.transformer import init_params
from smedjan.runconfig import OptimConfig, ScheduleConfig
from smedjan.tokenizer import Tokenizer, train_tokenizer
from smedjan.train.loss import distillation_loss
from smedjan.train.objectives import Forward
from smedjan.train.objectives.dpo import DPO
from smedjan.train.objectives.lm import LM
from smedjan.train.step import init_train_state, make_optimizer, make_train_step

TEXT = "the cat sat on the mat. what is two plus two? four. hello world, the answer is four.\n"


def tiny_cfg(vocab=320, **kw):
    base = dict(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    (d / "c.txt").write_text(TEXT * 40)
    tok = train_tokenizer([str(d / "c.txt")], d / "tok", 300, progress=False)
    cfg = tiny_cfg()
    save_hf(d / "model", cfg, init_params(cfg, jax.random.key(0)), tokenizer_dir=tok, dtype=jnp.float32)
    rows = []
    for i in range(24):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "what is two plus two?"},
                    {"role": "assistant", "content": "four"},
                ]
            }
        )
        rows.append({"instruction": "say hello", "input": "", "output": "hello world" + "!" * (i % 3)})
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [{"prompt": "what is two plus two?", "chosen": " four.", "rejected": " the cat sat."} for _ in range(16)]
    (d / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return d


def _run(*argv):
    assert main([str(a) for a in argv]) == 0


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


LOOP = ["--steps", 6, "--batch-size", 4, "--seq-len", 32, "--eval-every", 3, "--log-every", 1, "--no-progress"]


def test_packed_loss_equals_unpacked_per_example(model_dir):
    tok = Tokenizer.from_dir(model_dir / "model")
    enc = ChatEncoder(tok)
    exs = [
        enc.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        for q, a in [("what is two plus two?", "four"), ("hello", "world, the cat"), ("the mat", "sat on the mat.")]
    ]
    cfg, params = load_hf(model_dir / "model")
    fw = Forward(cfg, attn_impl="xla", loss_chunk=16)
    packed = pack(exs, 128)
    assert packed["inputs"].shape[0] == 1
    unpacked = pack(exs, 128, packed=False)

    def total(p, rows):
        return LM().loss(fw, p, {k: jnp.asarray(v) for k, v in rows.items()})[0]

    one_by_one = sum(float(total(params, {k: v[i : i + 1] for k, v in unpacked.items()})) for i in range(3))
    np.testing.assert_allclose(float(total(params, packed)), one_by_one, rtol=1e-5)
    g1 = jax.grad(total)(params, packed)
    g2 = jax.grad(total)(params, unpacked)
    for k in g1:
        np.testing.assert_allclose(np.asarray(g1[k]), np.asarray(g2[k]), atol=1e-6, rtol=1e-4)


def test_dpo_loss_matches_trl_formula_on_transformers_logprobs(model_dir):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    import transformers

    cfg, params = load_hf(model_dir / "model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir / "model"), torch_dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    inputs = rng.integers(3, 300, (3, 2, 16)).astype(np.int32)
    targets = np.concatenate([inputs[..., 1:], rng.integers(3, 300, (3, 2, 1))], -1).astype(np.int32)
    targets[..., :6] = -1  # the prompt
    targets[1, 1, 12:] = -1  # a shorter rejected completion
    ref = rng.normal(-40, 3, (3, 2)).astype(np.float32)
    batch = {"inputs": inputs, "targets": targets, "ref_logps": ref}

    # TRL's per-token log-probs: log_softmax(logits) gathered at the labels, summed over the completion mask
    with torch.no_grad():
        logits = hf(torch.as_tensor(inputs.reshape(6, 16), dtype=torch.long)).logits
    t = torch.as_tensor(targets.reshape(6, 16), dtype=torch.long)
    mask = t >= 0
    lp = torch.gather(logits.log_softmax(-1), 2, t.clamp(min=0)[..., None])[..., 0]
    logps = (lp * mask).sum(1).reshape(3, 2)
    n = mask.sum(1).reshape(3, 2).float()
    ref_t = torch.as_tensor(ref)
    chosen_lr, rejected_lr = logps[:, 0] - ref_t[:, 0], logps[:, 1] - ref_t[:, 1]
    fw = Forward(cfg, attn_impl="xla", loss_chunk=8)
    for obj in (DPO(beta=0.1), DPO(beta=0.3, label_smoothing=0.2), DPO(beta=0.5, loss_type="ipo")):
        delta = chosen_lr - rejected_lr
        if obj.loss_type == "ipo":  # TRL 1.16 DPOTrainer._compute_loss, "ipo": completion-length normalised
            want = ((chosen_lr / n[:, 0] - rejected_lr / n[:, 1]) - 1 / (2 * obj.beta)) ** 2
        else:  # cDPO (TRL's sigmoid with label smoothing; ε = 0 is TRL 1.16's "sigmoid")
            eps = obj.label_smoothing
            want = -(1 - eps) * F.logsigmoid(obj.beta * delta) - eps * F.logsigmoid(-obj.beta * delta)
        s, m = obj.loss(fw, params, jax.tree.map(jnp.asarray, batch))
        np.testing.assert_allclose(float(s) / 3, want.mean().item(), rtol=2e-4)
        rc, rr = obj.beta * chosen_lr, obj.beta * rejected_lr
        np.testing.assert_allclose(float(m["rewards/margins"]) / 3, (rc - rr).mean().item(), rtol=2e-4, atol=1e-5)
        np.testing.assert_allclose(float(m["rewards/accuracies"]) / 3, (rc > rr).float().mean().item())
        np.testing.assert_allclose(float(m["logps/chosen"]) / 3, logps[:, 0].mean().item(), rtol=1e-4)


def test_distillation_chunks_equal_whole_logits():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(50, 16)) * 0.3, jnp.float32)
    ht = jnp.asarray(rng.normal(size=(2, 7, 24)), jnp.float32)
    wt = jnp.asarray(rng.normal(size=(50, 24)) * 0.3, jnp.float32)
    t = rng.integers(0, 50, (2, 7))
    t[0, :2] = -1
    t = jnp.asarray(t, jnp.int32)
    T, a = 2.0, 0.7

    def whole(h, w):
        ls, lt = h @ w.T, ht @ wt.T
        valid = t >= 0
        ce = -jnp.take_along_axis(jax.nn.log_softmax(ls), jnp.where(valid, t, 0)[..., None], -1)[..., 0]
        ps, pt = jax.nn.log_softmax(ls / T), jax.nn.log_softmax(lt / T)
        kl = jnp.sum(jnp.exp(pt) * (pt - ps), -1) * T * T
        return jnp.sum(jnp.where(valid, a * kl + (1 - a) * ce, 0))

    def chunked(h, w):
        return distillation_loss(h, w, ht, wt, t, temperature=T, alpha=a, chunk_size=4)[0]

    np.testing.assert_allclose(float(chunked(h, w)), float(whole(h, w)), rtol=1e-5)
    for g1, g2 in zip(jax.grad(chunked, (0, 1))(h, w), jax.grad(whole, (0, 1))(h, w)):
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=1e-5, rtol=1e-4)


def test_non_finite_step_is_skipped():
    cfg = tiny_cfg(vocab=64)
    opt = make_optimizer(OptimConfig(lr=1e-2), ScheduleConfig(warmup_steps=0), 10)
    state = init_train_state(cfg, jax.random.key(0), opt)
    step = make_train_step(cfg, opt, compute_dtype=None, loss_chunk=16, donate=False)
    tokens = np.random.default_rng(0).integers(0, 64, (2, 9)).astype(np.int32)
    bad = dict(state.params)
    bad["model.norm.weight"] = state.params["model.norm.weight"].at[0].set(jnp.nan)
    s1, m1 = step(state._replace(params=bad), {"tokens": tokens})
    assert int(m1["skipped"]) == 1 and int(s1.step) == 1
    for k in bad:
        np.testing.assert_array_equal(np.asarray(s1.params[k]), np.asarray(bad[k]))  # untouched
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), s1.opt_state, state.opt_state
    )
    s2, m2 = step(state, {"tokens": tokens})
    assert (
        int(m2["skipped"]) == 0
        and float(jnp.abs(s2.params["model.norm.weight"] - state.params["model.norm.weight"]).max()) > 0
    )


def test_sft_full_and_lora_end_to_end(tmp_path, model_dir):
    import transformers

    full = tmp_path / "full"
    _run("sft", model_dir / "model", "--data", model_dir / "sft.jsonl", "--out", full, "--lr", 3e-3, *LOOP)
    log = _log(full)
    assert log[-1]["val_loss"] < [r for r in log if "val_loss" in r][0]["val_loss"]
    transformers.AutoModelForCausalLM.from_pretrained(str(full / "hf"))
    lora = tmp_path / "lora"
    _run(
        "sft",
        model_dir / "model",
        "--data",
        model_dir / "sft.jsonl",
        "--out",
        lora,
        "--lora",
        "--lora-rank",
        4,
        "--lr",
        1e-2,
        *LOOP,
    )
    ad = lora / "adapter"
    conf = json.loads((ad / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["base_model_name_or_path"] == str((model_dir / "model").resolve())
    vals = [r["val_loss"] for r in _log(lora) if "val_loss" in r]
    assert vals[-1] < vals[0]
    # merge -> a plain HF folder whose logits equal base + adapter
    _run("merge", model_dir / "model", ad, "--out", tmp_path / "merged", "--dtype", "fp32")
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    peft = pytest.importorskip("peft")
    import torch

    pm = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(model_dir / "model")), str(ad)
    )
    x = torch.as_tensor([[1, 5, 9, 40, 7]])
    with torch.no_grad():
        np.testing.assert_allclose(m(x).logits.numpy(), pm(x).logits.numpy(), atol=1e-4)


def test_lora_resume_is_exact(tmp_path, model_dir):
    args = [
        "sft",
        model_dir / "model",
        "--data",
        model_dir / "sft.jsonl",
        "--lora",
        "--lora-rank",
        2,
        "--lora-dropout",
        0.1,
        *LOOP,
    ]
    _run(*args, "--out", tmp_path / "a")
    _run(*args, "--out", tmp_path / "b", "--stop-after", 4)
    _run(*args, "--out", tmp_path / "b", "--resume")
    from safetensors.numpy import load_file

    a = load_file(str(tmp_path / "a/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b/adapter/adapter_model.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_dpo_and_distill_commands(tmp_path, model_dir, capsys):
    run = tmp_path / "dpo"
    _run(
        "dpo",
        model_dir / "model",
        "--data",
        model_dir / "dpo.jsonl",
        "--out",
        run,
        "--lora",
        "--lr",
        1e-2,
        "--beta",
        0.5,
        *LOOP,
    )
    log = _log(run)
    first, last = [r for r in log if "val_loss" in r][0], [r for r in log if "val_loss" in r][-1]
    assert "rewards/margins" in log[0] and last["val_rewards/margins"] > first["val_rewards/margins"]
    kd = tmp_path / "kd"
    _run(
        "distill",
        "--teacher",
        model_dir / "model",
        "--size",
        "tiny",
        "--dim",
        16,
        "--layers",
        1,
        "--heads",
        2,
        "--kv-heads",
        1,
        "--data",
        model_dir / "sft.jsonl",
        "--out",
        kd,
        "--lr",
        3e-3,
        *LOOP,
    )
    log = _log(kd)
    assert "kl" in log[0] and (kd / "hf" / "config.json").is_file()
    assert json.loads((kd / "hf/config.json").read_text())["hidden_size"] == 16
    # a student with another tokenizer is refused in one line
    other = tmp_path / "other"
    (tmp_path / "o.txt").write_text("zebra quantum " * 200)
    tok = train_tokenizer([str(tmp_path / "o.txt")], tmp_path / "otok", 280, progress=False)
    cfg = tiny_cfg()
    save_hf(other, cfg, init_params(cfg, jax.random.key(1)), tokenizer_dir=tok, dtype=jnp.float32)
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(model_dir / "model"),
                "--student",
                str(other),
                "--data",
                str(model_dir / "sft.jsonl"),
                "--out",
                str(tmp_path / "kd2"),
            ]
        )
        == 1
    )
    assert "different tokenizers" in capsys.readouterr().err


def _tiny_job(batch, val=(), objective=None):
    from smedjan.train.loop import Job

    cfg = tiny_cfg(vocab=64)
    exported = {}
    return (
        cfg,
        exported,
        Job(
            model_cfg=cfg,
            init=lambda key, opt, mesh: init_train_state(cfg, key, opt, mesh=mesh),
            batch=batch,
            val=list(val),
            export=lambda state: exported.update(params=state.params),
            objective=objective,
            tokens_per_step=4 * 8,
        ),
    )


def _rc(out, **kw):
    from smedjan.runconfig import from_dict

    base = dict(out=str(out), steps=8, batch_size=4, seq_len=8, lr=1e-2, warmup_steps=0, log_every=1, progress=False)
    return from_dict({**base, "eval_every": 0, "precision": "fp32", "loss_chunk": 16, **kw})


def test_a_run_of_non_finite_steps_stops_with_a_checkpoint(tmp_path):
    from dataclasses import dataclass

    from smedjan.train.loop import BadStepsError, fit

    @dataclass(frozen=True)
    class Scaled(LM):  # the batch's "scale" multiplies the loss: NaN from step 3 on
        def loss(self, fw, params, batch, frozen=None):
            s, aux = LM.loss(self, fw, params, batch)
            return s * batch["scale"][0], aux

    toks = np.random.default_rng(0).integers(0, 64, (4, 9)).astype(np.int32)
    batch = lambda i: {"tokens": toks, "scale": np.full((4,), np.nan if i >= 2 else 1.0, np.float32)}  # noqa: E731
    _, _, job = _tiny_job(batch, objective=Scaled())
    with pytest.raises(BadStepsError, match="3 steps in a row had a non-finite loss"):
        fit(job, _rc(tmp_path, max_bad_steps=3))
    log = _log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and log[-1]["skipped_steps"] == 3
    assert [r["loss"] is None for r in log] == [False, False, True, True, True]  # a skipped step's NaN is not logged
    from smedjan.train import checkpointing as ck

    assert ck.checkpoints(tmp_path)[-1][0] == 5


def test_early_stopping_exports_the_best_checkpoint(tmp_path):
    from smedjan.train.loop import fit

    fives, sevens = np.full((4, 9), 5, np.int32), np.full((4, 8), 7, np.int32)
    val = [{"inputs": sevens, "targets": sevens}]  # training on 5 -> 5 only makes 7 -> 7 less likely
    cfg, exported, job = _tiny_job(lambda i: {"tokens": fives}, val)
    summary = fit(job, _rc(tmp_path, eval_every=1, early_stopping_patience=2, lr=3e-2))
    vals = [r["val_loss"] for r in _log(tmp_path) if "val_loss" in r]
    assert summary["step"] == 3 and summary["best_step"] == 1 and len(vals) == 3
    assert vals[0] < vals[1] < vals[2]
    from smedjan.train.objectives import Forward

    best = LM().loss(Forward(cfg, attn_impl="xla"), exported["params"], jax.tree.map(jnp.asarray, val[0]))[0] / 32
    np.testing.assert_allclose(float(best), vals[0], rtol=1e-5)

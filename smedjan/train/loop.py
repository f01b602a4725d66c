"""The training run: data, model, step loop, validation, logging, checkpoints, export.

Run folder::

    run_config.json      the options of the run (for the record and for `export-hf`)
    model_config.json    the model's HF config (resume reads the shape from here)
    tokenizer/           a copy of the tokenizer files (exported with the model)
    log.jsonl            one record per log interval and per validation
    checkpoints/step_*/  TrainState + meta (data position, seed, ...), newest `keep` kept
    hf/                  the final Hugging Face folder (config, safetensors, tokenizer)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from smedjan.backend import settings
from smedjan.hardware import peak_flops_for
from smedjan.runconfig import RunConfig


class TrainError(ValueError):
    """Bad options for a run (printed as one line by the CLI)."""


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_model_config(rc: RunConfig, tokenizer):
    """The run's ModelConfig: preset/config + overrides; vocab = tokenizer's rounded up to 64."""
    from smedjan.config import ConfigError, resolve_config

    overrides = dict(rc.model.overrides)
    overrides.setdefault("vocab_size", round_up(tokenizer.vocab_size, 64))
    overrides.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    try:
        cfg = resolve_config(rc.model.size, **overrides)
    except (ConfigError, TypeError) as e:
        raise TrainError(str(e)) from None
    return cfg


def check_model_fits(cfg, tokenizer, seq_len: int) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise TrainError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{cfg.vocab_size}; use --vocab-size >= {tokenizer.vocab_size} (or leave it unset)"
        )
    if seq_len > cfg.max_position_embeddings:
        raise TrainError(
            f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}; raise it with --max-seq-len"
        )


@lru_cache(maxsize=8)
def _compiled_steps(
    model_cfg, optim, schedule, steps, attn_impl, remat, compute_dtype, grad_accum, loss_chunk, mesh, objective, lora
):
    """One jitted train/eval step per configuration per process (re-used by repeated runs/tests)."""
    from smedjan.train.step import make_eval_step, make_optimizer, make_train_step

    optimizer = make_optimizer(optim, schedule, steps)
    kw = dict(attn_impl=attn_impl, compute_dtype=compute_dtype, loss_chunk=loss_chunk, mesh=mesh)
    kw.update(objective=objective, lora=lora)
    step = make_train_step(model_cfg, optimizer, remat=remat, grad_accum=grad_accum, **kw)
    return optimizer, step, make_eval_step(model_cfg, **kw)


@dataclass
class Job:
    """What one training run is, apart from the loop every objective shares (`fit`).

    init(key, optimizer, mesh) -> TrainState: the starting state (fresh weights, a loaded checkpoint,
    fresh LoRA adapters). frozen: the pytree the objective reads but never trains (the LoRA base, a
    teacher), passed to every step. batch(i) -> this
    process's rows of batch i as numpy arrays, a pure function of i (exact resume); val: evaluation
    batches (whole on every host). export(state) -> extra summary entries, run at the end on process
    0 (HF folder, PEFT adapter). meta: recorded in every checkpoint; check_meta(meta) refuses a resume
    from an incompatible one.
    """

    model_cfg: object
    init: object
    batch: object
    val: list
    export: object
    objective: object = None
    lora: object = None
    frozen: object = None
    meta: dict = field(default_factory=dict)
    check_meta: object = None
    tokens_per_step: int = 0
    describe: str = ""


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step (a second Ctrl-C aborts)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to abort)",
            file=sys.stderr,
        )

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Logger:
    def __init__(self, path: Path, enabled: bool):
        self.enabled = enabled
        self.f = open(path, "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter  # only if it happens to be installed
            except ImportError:
                try:
                    import tensorboard  # noqa: F401
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    SummaryWriter = None
            if SummaryWriter is not None:
                try:
                    self.tb = SummaryWriter(str(path.parent / "tensorboard"))
                except Exception:
                    self.tb = None

    def log(self, record: dict):
        if not self.enabled:
            return
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
        if self.f:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def _truncate_log(path: Path, step: int) -> None:
    """Drop records past the checkpoint being resumed (steps that will be re-run), keeping one curve."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def evaluate_metrics(eval_step, params, batches, put, frozen=None) -> dict:
    """{"loss": mean over the objective's count, and each objective metric's mean} over `batches`."""
    total, count, sums = 0.0, 0, {}
    for b in batches:
        s, n, aux = eval_step(params, {k: put(v) for k, v in b.items()}, frozen)
        total += float(s)
        count += int(n)
        for k, v in aux.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {"loss": total / max(count, 1), **{k: v / max(count, 1) for k, v in sums.items()}}


def train(rc: RunConfig) -> dict:
    """Run (or resume) a training run; returns a summary dict (final step, losses, paths).

    A run that fails before its first checkpoint leaves no half-made run folder behind: a folder this
    call created is removed again, except the tokenizer and data that `--corpus` built (work worth keeping).
    """
    rc = rc.validate()
    out = Path(rc.out)
    created = not out.exists()
    try:
        return _run(rc)
    except BaseException:
        if created and out.is_dir() and not (out / "checkpoints").is_dir():
            _remove_run_folder(out, keep=("tokenizer", "data") if rc.data.corpus else ())
        raise


def _remove_run_folder(out: Path, keep: tuple[str, ...]) -> None:
    try:
        for p in out.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        if not any(out.iterdir()):
            out.rmdir()
    except OSError:  # another process of a multi-host run got there first: its cleanup, not ours
        pass


def _run(rc: RunConfig) -> dict:
    """Pre-training: a token dataset sampled in random windows, the LM objective, a HF folder at the end."""
    import jax

    from smedjan.config import ModelConfig
    from smedjan.data import TokenDataset, prepare_corpus
    from smedjan.sharding import initialize_distributed, process_rows
    from smedjan.tokenizer import TOKENIZER_FILES_COPIED, Tokenizer
    from smedjan.train import checkpointing as ck
    from smedjan.train.loader import WindowSampler, eval_batches
    from smedjan.train.step import init_train_state

    if rc.mesh.distributed:
        initialize_distributed()
    main = jax.process_index() == 0
    out = Path(rc.out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- data & tokenizer ----
    if rc.data.corpus:
        rc = dataclasses.replace(rc, data=prepare_corpus(out, rc.data))
    ds = TokenDataset(rc.data.dataset)
    ds.check_tokenizer(rc.data.tokenizer)
    tokenizer = Tokenizer.from_dir(rc.data.tokenizer)
    tok_copy = out / "tokenizer"
    if main and Path(rc.data.tokenizer).resolve() != tok_copy.resolve():
        tok_copy.mkdir(exist_ok=True)
        for name in TOKENIZER_FILES_COPIED:
            if (Path(rc.data.tokenizer) / name).is_file():
                shutil.copy2(Path(rc.data.tokenizer) / name, tok_copy / name)

    # ---- model ----
    if rc.ckpt.resume and ck.checkpoints(out) and (out / "model_config.json").is_file():
        model_cfg = ModelConfig.from_json_file(out / "model_config.json")
    else:
        model_cfg = build_model_config(rc, tokenizer)
    check_model_fits(model_cfg, tokenizer, rc.seq_len)
    if main:
        (out / "model_config.json").write_text(json.dumps(model_cfg.to_hf_dict(), indent=2))
        (out / "run_config.json").write_text(json.dumps(rc.to_dict(), indent=2))

    try:
        sampler = WindowSampler(
            ds.tokens("train", stream=rc.data.stream),
            rc.batch_size,
            rc.seq_len,
            rc.seed,
            rows=process_rows(rc.batch_size),
        )
    except ValueError as e:
        raise TrainError(str(e)) from None

    def check_meta(meta):
        if meta.get("dataset_tokenizer_sha256") not in (None, ds.tokenizer_hash):
            raise TrainError(f"the checkpoint was trained on data from another tokenizer than {rc.data.dataset}")

    def export(state):
        result = {}
        if rc.ckpt.export:
            from smedjan.checkpoint import save_hf
            from smedjan.train.record import run_record

            hf = save_hf(
                out / "hf", model_cfg, state.params, tokenizer_dir=tok_copy, run_info=run_record(out, int(state.step))
            )
            result["hf_dir"] = str(hf)
            print(f"saved Hugging Face folder {hf}")
        if rc.log.samples:
            result["samples"] = print_samples(state.params, model_cfg, tokenizer, rc)
        return result

    job = Job(
        model_cfg=model_cfg,
        init=lambda key, optimizer, mesh: init_train_state(model_cfg, key, optimizer, mesh=mesh),
        batch=lambda i: {"tokens": sampler.batch(i)},
        val=eval_batches(ds.tokens("val", stream=rc.data.stream), rc.batch_size, rc.seq_len, rc.log.eval_batches),
        export=export,
        meta={
            "sampler": "window-v1",
            "dataset": str(Path(rc.data.dataset).resolve()),
            "dataset_tokenizer_sha256": ds.tokenizer_hash,
        },
        check_meta=check_meta,
        tokens_per_step=rc.batch_size * rc.seq_len,
        describe=f"{ds.num_tokens('train'):,} train tokens",
    )
    return fit(job, rc)


class BadStepsError(TrainError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def fit(job: Job, rc: RunConfig) -> dict:
    """The training loop every objective shares: mesh, compiled step, resume, prefetching, logging,
    validation (with early stopping), checkpoints, signals, non-finite step skipping, export."""
    import jax
    import jax.numpy as jnp

    from smedjan.sharding import ShardingError, batch_divisor, batch_sharding, make_mesh, process_rows, put_batch
    from smedjan.train import checkpointing as ck
    from smedjan.train.loader import Prefetcher
    from smedjan.train.step import _init_fn, frozen_shardings, make_schedule, state_shardings

    main = jax.process_index() == 0
    out = Path(rc.out)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = job.model_cfg
    resuming = rc.ckpt.resume and bool(ck.checkpoints(out))
    if rc.ckpt.resume and not resuming:
        print(f"--resume: no checkpoint in {out}/checkpoints, starting from scratch", file=sys.stderr)

    # ---- mesh & step ----
    try:
        mesh = make_mesh(rc.mesh.shape)
    except ShardingError as e:
        raise TrainError(str(e)) from None
    div = batch_divisor(mesh)
    if rc.batch_size % rc.grad_accum or (rc.batch_size // rc.grad_accum) % div:
        raise TrainError(
            f"--batch-size {rc.batch_size} must divide by --grad-accum {rc.grad_accum} and each "
            f"micro-batch ({rc.batch_size}/{rc.grad_accum}) by data·fsdp = {div}"
        )
    precision = rc.compute.precision
    if precision == "auto":
        precision = "fp32" if settings().platform == "cpu" else "bf16"
    compute_dtype = jnp.bfloat16 if precision == "bf16" else None
    c = rc.compute
    optimizer, train_step, eval_step = _compiled_steps(
        model_cfg,
        rc.optim,
        rc.schedule,
        rc.steps,
        c.attn_impl,
        c.remat,
        compute_dtype,
        rc.grad_accum,
        c.loss_chunk,
        mesh,
        job.objective,
        job.lora,
    )
    st_sh = state_shardings(model_cfg, optimizer, mesh, lora=job.lora)
    b_sh = batch_sharding(mesh, ndim=1)  # rows split on the first axis, whatever the rank of a batch array
    frozen = job.frozen
    if frozen is not None:
        frozen = jax.device_put(frozen, frozen_shardings(model_cfg, job.objective, job.lora, mesh))

    # ---- state ----
    start = 0
    restored = None
    template = jax.eval_shape(_init_fn(model_cfg, optimizer, jnp.float32, job.lora), jax.random.key(rc.seed))
    say = (lambda msg: print(msg, file=sys.stderr)) if main else (lambda msg: None)
    if resuming:
        try:
            restored = ck.restore_latest(out, template, st_sh, strict=rc.ckpt.strict_resume, say=say)
        except ck.CheckpointError as e:
            raise TrainError(str(e)) from None
    if restored is not None:
        state, meta, latest = restored
        start = int(meta["step"])
        if job.check_meta is not None:
            job.check_meta(meta)
        if meta.get("seed", rc.seed) != rc.seed:
            print(f"--resume: the checkpoint used --seed {meta['seed']}, continuing with it", file=sys.stderr)
            rc = dataclasses.replace(rc, seed=int(meta["seed"]))
        if main:
            print(f"resumed from {latest} (step {start}, data position {meta['data_position']})")
    else:
        state = job.init(jax.random.key(rc.seed), optimizer, mesh)
    if main:  # records past the start are re-run now (also those of a run killed before its first checkpoint)
        _truncate_log(out / "log.jsonl", start)

    # ---- data pipeline ----
    put = lambda a: put_batch(a, b_sh)  # noqa: E731
    rows = process_rows(rc.batch_size)
    put_eval = lambda a: put_batch(a[rows], b_sh)  # noqa: E731  (eval batches are built whole on every host)
    schedule = make_schedule(rc.optim, rc.schedule, rc.steps)

    n_dev = jax.device_count()
    peak = rc.log.peak_flops or (peak_flops_for(jax.devices()[0].device_kind) or 0) * n_dev or None
    flops_per_step = model_cfg.flops_per_token(rc.seq_len) * job.tokens_per_step
    logger = _Logger(out / "log.jsonl", main)
    summary = {
        "run_dir": str(out),
        "start_step": start,
        "params": model_cfg.num_params(),
        "precision": precision,
        "mesh": dict(mesh.shape),
        "skipped_steps": 0,
    }

    def meta_for(step):
        return {
            "step": step,
            "data_position": step,
            "seed": rc.seed,
            **job.meta,
            "batch_size": rc.batch_size,
            "seq_len": rc.seq_len,
            "model_config": model_cfg.to_hf_dict(),
            "run_config": rc.to_dict(),
            "time": time.time(),
        }

    writer = ck.CheckpointWriter(out, keep=rc.ckpt.keep, device_copy=rc.ckpt.device_copy)
    best_writer = ck.CheckpointWriter(out / "best", keep=1)

    def save(step):
        return writer.save(state, meta_for(step))  # written in the background; `writer.close()` waits

    best = {"value": math.inf, "step": None, "stale": 0}
    patience = rc.log.early_stopping_patience

    def run_eval(step):
        """Validation metrics (logged); with early stopping, the best state is kept in RUN/best."""
        if not job.val:
            return None
        m = evaluate_metrics(eval_step, state.params, job.val, put_eval, frozen)
        rec = {"step": step, "val_loss": m["loss"], **{f"val_{k}": v for k, v in m.items() if k != "loss"}}
        if job.objective is None or job.objective.name in ("lm", "sft"):
            rec["val_ppl"] = math.exp(min(m["loss"], 50))
        logger.log(rec)
        summary.update({k: v for k, v in rec.items() if k != "step"})
        if patience:
            if m["loss"] < best["value"]:
                best.update(value=m["loss"], step=step, stale=0)
                best_writer.save(state, meta_for(step))
            else:
                best["stale"] += 1
        return m

    def describe_eval(step, m):
        extra = "".join(f", {k} {v:.4f}" for k, v in m.items() if k != "loss")
        return f"step {step}: val loss {m['loss']:.4f}{extra}"

    from tqdm import tqdm

    bar = tqdm(total=rc.steps, initial=start, desc="train", disable=not (rc.log.progress and main), dynamic_ncols=True)
    if main:
        print(
            f"model {model_cfg.num_params() / 1e6:.2f}M params, vocab {model_cfg.vocab_size}, {precision}, "
            f"mesh {dict(mesh.shape)}, {job.describe}; {rc.batch_size}x{rc.seq_len} tokens/step",
            file=sys.stderr,
        )
    prefetch = Prefetcher(job.batch, put, start)
    max_bad = rc.ckpt.max_bad_steps
    pending: list[tuple[int, dict]] = []
    step = start
    stopped = early = False
    bad_streak = 0
    t_last, step_last = time.time(), start
    t0 = time.time()
    try:
        with _StopFlag() as stop, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
            while step < rc.steps:
                idx, batch = prefetch.next()
                assert idx == step, (idx, step)
                state, metrics = train_step(state, batch, frozen)
                step += 1
                pending.append((step, metrics))
                done_now = step - start
                last = step == rc.steps
                stop_now = stop.requested or (rc.ckpt.stop_after is not None and done_now >= rc.ckpt.stop_after)
                if step % rc.log.log_every == 0 or last or stop_now:
                    fetched = jax.device_get([m for _, m in pending])  # the only host sync of the loop
                    for f in fetched:
                        bad_streak = bad_streak + 1 if f["skipped"] else 0
                        summary["skipped_steps"] += int(f["skipped"])
                    good = [f for f in fetched if not f["skipped"]]  # a skipped step's loss is NaN/Inf: not logged
                    now = time.time()
                    dt = max(now - t_last, 1e-9)
                    tps = (step - step_last) * job.tokens_per_step / dt
                    loss = float(np.mean([f["loss"] for f in good])) if good else None
                    rec = {
                        "step": step,
                        "loss": loss,
                        "lr": float(schedule(step - 1)),
                        "grad_norm": float(good[-1]["grad_norm"]) if good else None,
                        "tokens_per_s": tps,
                        "mfu": (flops_per_step * (step - step_last) / dt / peak) if peak else None,
                        "elapsed_s": now - t0,
                    }
                    extra = [k for k in fetched[-1] if "/" in k or k in ("kl", "ce")]
                    rec.update({k: float(np.mean([f[k] for f in good])) for k in extra if good})
                    if summary["skipped_steps"]:
                        rec["skipped_steps"] = summary["skipped_steps"]
                    logger.log(rec)
                    if loss is not None:
                        summary["loss"] = loss
                    bar.set_postfix(
                        loss=f"{loss:.4f}" if loss is not None else "skipped",
                        tok_s=f"{tps:,.0f}",
                        mfu=f"{rec['mfu']:.1%}" if rec["mfu"] is not None else "n/a",
                    )
                    bar.update(step - bar.n)
                    pending.clear()
                    t_last, step_last = time.time(), step
                    if max_bad and bad_streak >= max_bad:
                        save(step)
                        raise BadStepsError(
                            f"{bad_streak} steps in a row had a non-finite loss or gradient norm (up to step {step}; "
                            "their updates were skipped); lower --lr or check the data. Checkpoint saved; "
                            "--max-bad-steps sets the limit"
                        )
                if rc.log.eval_every and step % rc.log.eval_every == 0 and not last:
                    m = run_eval(step)
                    if m is not None:
                        bar.write(describe_eval(step, m))
                        if patience and best["stale"] >= patience:
                            bar.write(
                                f"early stopping: no better val loss in {patience} evaluations "
                                f"(best {best['value']:.4f} at step {best['step']})"
                            )
                            early = True
                            break
                    t_last = time.time()
                if rc.ckpt.save_every and step % rc.ckpt.save_every == 0 and not last:
                    save(step)
                    t_last = time.time()
                if stop_now and not last:
                    stopped = True
                    break
    except BaseException:
        writer.close()
        best_writer.close()
        raise
    finally:
        prefetch.close()
        bar.close()

    summary["step"] = step
    summary["wall_s"] = time.time() - t0
    if stopped:
        path = save(step)
        writer.close()
        best_writer.close()
        logger.close()
        if main:
            print(f"stopped at step {step}; checkpoint {path}; continue with the same command plus --resume")
        summary["stopped"] = True
        summary["checkpoint"] = str(path)
        return summary

    m = None if early else run_eval(step)
    path = save(step)
    writer.close()
    best_writer.close()
    summary["checkpoint"] = str(path)
    if main and m is not None:
        print(
            describe_eval(step, m)
            + (f", perplexity {math.exp(min(m['loss'], 50)):.2f}" if "val_ppl" in summary else "")
        )
    if patience and best["step"] is not None:
        # the exported model is the best one validation saw
        state, _, _ = ck.restore_latest(out / "best", template, st_sh, strict=True, say=say)
        summary["best_step"], summary["best_val"] = best["step"], best["value"]
        if main:
            print(f"exporting the best checkpoint: step {best['step']}, val loss {best['value']:.4f}")
    state = state._replace(params=_host_params(state.params))  # every process gathers; process 0 writes
    if main:
        summary.update(job.export(state) or {})
    logger.close()
    return summary


def _host_params(params) -> dict:
    """The parameters as numpy on every process (multi-host: gathered, which every process must call)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def print_samples(params, model_cfg, tokenizer, rc: RunConfig) -> list[str]:
    """A few sampled continuations (the KV-cache decoder, smedjan.infer)."""
    import jax

    prompts = [rc.log.sample_prompt] if rc.log.sample_prompt else ["", "ROMEO:", "First Citizen:\n"]
    prompts = (prompts * rc.log.samples)[: rc.log.samples]
    ids = [tokenizer.encode_prompt(p) for p in prompts]
    params = jax.device_get(params)
    from smedjan.infer.runner import generate

    outs = generate(
        params,
        model_cfg,
        ids,
        max_new_tokens=rc.log.sample_tokens,
        temperature=0.8,
        top_k=50,
        seed=rc.seed,
        eos_id=tokenizer.stop_ids,
    )
    texts = []
    for p, o in zip(prompts, outs):
        text = p + tokenizer.decode(o, skip_special_tokens=True)
        texts.append(text)
        print(f"--- sample ---\n{text}\n")
    return texts

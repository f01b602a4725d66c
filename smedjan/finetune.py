"""Fine-tuning a Hugging Face checkpoint: SFT (full or LoRA), DPO and distillation, over the one training loop.

    from smedjan.finetune import FinetuneConfig, finetune
    from smedjan.runconfig import OptimConfig, RunConfig
    from smedjan.train.objectives.sft import SFT

    rc = RunConfig(out="runs/sft", steps=200, batch_size=8, seq_len=512, optim=OptimConfig(lr=2e-4))
    ft = FinetuneConfig(model="path/or/hub-id", data=("chat.jsonl",), lora=True, lora_rank=16)
    summary = finetune(rc, ft, SFT())          # -> runs/sft/adapter (PEFT) or runs/sft/hf (full)

Each objective gets its data and frozen weights here, then `train.loop.fit` runs it exactly as it runs
pre-training (progress bar, validation, JSONL log, atomic checkpoints, exact resume, mesh flags,
non-finite step skipping, early stopping). With LoRA the base is frozen (stored in bf16 with
``base_dtype="bf16"``: the QLoRA-style memory saving short of int8, which smedjan does not have yet)
and the optimizer holds state for the adapters only.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from smedjan.checkpoint import TOKENIZER_FILES, CheckpointError, load_config, load_params, resolve_path, save_hf
from smedjan.errors import UserError
from smedjan.model.lora import LoraConfig, LoraError
from smedjan.runconfig import RunConfig
from smedjan.tokenizer import Tokenizer, TokenizerError
from smedjan.train.loop import Job, TrainError, fit


class FinetuneError(UserError):
    pass


@dataclass
class FinetuneConfig:
    """What fine-tuning adds to a run's options (the shared ones stay in RunConfig)."""

    model: str = ""  # HF folder or hub id of the model trained (distill: the student; "" with student_size)
    data: tuple[str, ...] = ()
    val_data: tuple[str, ...] = ()
    val_fraction: float = 0.05  # held out of --data when no --val-data
    skip_bad_rows: bool = False
    pack: bool = True
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    base_dtype: str = "auto"  # LoRA's frozen base: bf16 | fp32 | auto (bf16 on accelerators)
    teacher: str = ""  # distill: the teacher's HF folder or hub id
    student_size: str = ""  # distill: a preset (or config.json) for a fresh student
    extra: dict = field(default_factory=dict)

    def lora_config(self) -> LoraConfig | None:
        if not self.lora:
            return None
        try:
            return LoraConfig(
                rank=self.lora_rank,
                alpha=self.lora_alpha,
                dropout=self.lora_dropout,
                targets=LoraConfig.parse_targets(self.lora_targets),
            )
        except LoraError as e:
            raise FinetuneError(str(e)) from None


# ---- models and tokenizers ---------------------------------------------------------------------------
def load_model(path: str, dtype=jnp.float32):
    """(ModelConfig, params, Tokenizer, folder) of a HF folder or hub id that holds a tokenizer."""
    try:
        folder = resolve_path(path)
        cfg = load_config(folder)
        params = load_params(folder, cfg, dtype=dtype)
    except CheckpointError as e:
        raise FinetuneError(str(e)) from None
    return cfg, params, load_tokenizer(folder), folder


def load_tokenizer(folder: Path) -> Tokenizer:
    try:
        return Tokenizer.from_dir(folder)
    except TokenizerError as e:
        raise FinetuneError(f"{e}; fine-tuning reads the checkpoint's own tokenizer") from None


def check_same_tokenizer(a: Tokenizer, b: Tokenizer, a_name: str, b_name: str) -> None:
    if a._tk.get_vocab(with_added_tokens=True) != b._tk.get_vocab(with_added_tokens=True):
        raise FinetuneError(
            f"{a_name} and {b_name} have different tokenizers ({a.vocab_size} vs {b.vocab_size} tokens); "
            "distillation compares next-token distributions, so both must share one tokenizer"
        )


def _base_dtype(ft: FinetuneConfig):
    name = ft.base_dtype
    if name == "auto":
        name = "fp32" if jax.default_backend() == "cpu" else "bf16"
    if name not in ("bf16", "fp32"):
        raise FinetuneError(f"--base-dtype must be bf16, fp32 or auto, got {ft.base_dtype!r}")
    return jnp.bfloat16 if name == "bf16" else jnp.float32


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


# ---- data ----------------------------------------------------------------------------------------------
def _split(ft: FinetuneConfig, rc: RunConfig, load):
    """(train items, val items, description) with `load(paths) -> (items, Stats)`."""
    from smedjan.data.chat import describe, split_holdout

    items, stats = load(list(ft.data))
    if ft.val_data:
        val, vstats = load(list(ft.val_data))
        return items, val, f"{describe(stats)}; val {describe(vstats)}"
    train, val = split_holdout(items, ft.val_fraction, rc.seed)
    return train, val, f"{describe(stats)}; {len(val)} held out for validation"


def sft_arrays(ft: FinetuneConfig, rc: RunConfig, tokenizer):
    """(train rows, val rows, description) of SFT/distillation data, packed per `ft.pack`."""
    from smedjan.data.chat import pack, sft_examples

    def load(paths):
        return sft_examples(paths, tokenizer, max_len=rc.seq_len + 1, skip_bad_rows=ft.skip_bad_rows)

    train, val, what = _split(ft, rc, load)
    tr = pack(train, rc.seq_len, packed=ft.pack)
    va = pack(val, rc.seq_len, packed=ft.pack) if val else None
    return tr, va, f"{what}; {len(tr['inputs'])} {'packed ' if ft.pack else ''}rows of {rc.seq_len}"


def preference_arrays(ft: FinetuneConfig, rc: RunConfig, tokenizer):
    from smedjan.data.preference import pair_arrays, preference_pairs

    def load(paths):
        return preference_pairs(paths, tokenizer, max_len=rc.seq_len + 1, skip_bad_rows=ft.skip_bad_rows)

    train, val, what = _split(ft, rc, load)
    return pair_arrays(train, rc.seq_len), (pair_arrays(val, rc.seq_len) if val else None), what


def reference_logps(objective, model_cfg, params, arrays, batch_size: int, compute_dtype=None, progress=True):
    """DPO's reference log-probs [N, 2] of every pair under `params`, computed once before training."""
    from tqdm import tqdm

    from smedjan.train.step import forward_knobs

    fw = forward_knobs(model_cfg, "auto", "none", compute_dtype, None, None)
    fn = jax.jit(lambda p, b: objective.logps(fw, p, b)[0])
    n = len(arrays["inputs"])
    out = np.zeros((n, 2), np.float32)
    for i in tqdm(range(0, n, batch_size), desc="reference log-probs", disable=not progress, dynamic_ncols=True):
        j = min(i + batch_size, n)
        b = {
            k: np.concatenate([arrays[k][i:j], np.repeat(arrays[k][:1], batch_size - (j - i), 0)])
            for k in ("inputs", "targets")
        }
        out[i:j] = np.asarray(fn(params, b))[: j - i]
    return out


# ---- the run -------------------------------------------------------------------------------------------
def finetune(rc: RunConfig, ft: FinetuneConfig, objective) -> dict:
    """Fine-tune `ft.model` with `objective` (SFT, DPO, Distill) under the run options `rc`; returns the
    run summary ("adapter_dir" or "hf_dir" among them)."""
    from smedjan.sharding import process_rows
    from smedjan.train.loader import RowSampler, eval_rows
    from smedjan.train.objectives.distill import Distill
    from smedjan.train.step import init_train_state

    if not ft.data:
        raise FinetuneError("give the training data (--data FILE...)")
    rc = dataclasses.replace(rc, objective=objective).validate()
    lcfg = ft.lora_config()
    out = Path(rc.out)
    out.mkdir(parents=True, exist_ok=True)
    main = jax.process_index() == 0
    name = objective.name

    # ---- models ----
    teacher = None
    if isinstance(objective, Distill):
        if not ft.teacher:
            raise FinetuneError("distillation needs a teacher (--teacher)")
        t_cfg, t_params, tokenizer, t_folder = load_model(ft.teacher)
        if ft.student_size:
            from smedjan.config import ConfigError, resolve_config

            try:
                cfg = resolve_config(
                    ft.student_size,
                    **{
                        "max_position_embeddings": t_cfg.max_position_embeddings,
                        **rc.model.overrides,
                        "vocab_size": t_cfg.vocab_size,
                        "bos_token_id": t_cfg.bos_token_id,
                        "eos_token_id": t_cfg.eos_token_id,
                        "pad_token_id": t_cfg.pad_token_id,
                    },
                )
            except (ConfigError, TypeError) as e:
                raise FinetuneError(str(e)) from None
            params, folder = None, t_folder
        else:
            cfg, params, s_tok, folder = load_model(ft.model)
            check_same_tokenizer(s_tok, tokenizer, ft.model, ft.teacher)
        if cfg.vocab_size != t_cfg.vocab_size:
            raise FinetuneError(
                f"the student's vocab_size {cfg.vocab_size} differs from the teacher's {t_cfg.vocab_size}; "
                "distillation needs one vocabulary"
            )
        t_dtype = jnp.bfloat16 if (rc.compute.precision == "bf16" or jax.default_backend() != "cpu") else jnp.float32
        teacher = jax.tree.map(lambda a: a.astype(t_dtype), t_params)
        objective = Distill(teacher_cfg=t_cfg, alpha=objective.alpha, temperature=objective.temperature)
    else:
        if not ft.model:
            raise FinetuneError("give the model to fine-tune (a HF folder or hub id)")
        cfg, params, tokenizer, folder = load_model(ft.model)
    if rc.seq_len > cfg.max_position_embeddings:
        raise FinetuneError(
            f"--seq-len {rc.seq_len} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}"
        )

    # ---- data ----
    if name == "dpo":
        train, val, what = preference_arrays(ft, rc, tokenizer)
        compute = (
            jnp.bfloat16
            if (rc.compute.precision == "bf16" or (rc.compute.precision == "auto" and jax.default_backend() != "cpu"))
            else None
        )
        for arr in (train, val):
            if arr is not None:
                arr["ref_logps"] = reference_logps(
                    objective, cfg, params, arr, rc.batch_size, compute, rc.log.progress and main
                )
        tokens_per_step = 2 * rc.batch_size * rc.seq_len
    else:
        train, val, what = sft_arrays(ft, rc, tokenizer)
        tokens_per_step = rc.batch_size * rc.seq_len
    if main:
        print(f"data: {what}", file=sys.stderr)
    try:
        sampler = RowSampler(train, rc.batch_size, rc.seed, rows=process_rows(rc.batch_size))
    except ValueError as e:
        raise TrainError(str(e)) from None

    # ---- state ----
    frozen = {}
    if teacher is not None:
        frozen["teacher"] = teacher
    if lcfg is not None:
        if params is None:
            raise FinetuneError("LoRA needs a pretrained student (--student), not a fresh --size")
        frozen["base"] = jax.tree.map(lambda a: a.astype(_base_dtype(ft)), params)
        params = None

        def init(key, optimizer, mesh):
            return init_train_state(cfg, key, optimizer, mesh=mesh, lora=lcfg)
    elif params is None:

        def init(key, optimizer, mesh):
            return init_train_state(cfg, key, optimizer, mesh=mesh)
    else:

        def init(key, optimizer, mesh):
            return init_train_state(cfg, key, optimizer, mesh=mesh, params=params)

    source = str(folder.resolve()) if Path(ft.model or ft.teacher).exists() else (ft.model or ft.teacher)
    if main:
        (out / "finetune_config.json").write_text(
            json.dumps(
                {"objective": name, **{k: v for k, v in vars(objective).items() if k != "teacher_cfg"}, **vars(ft)},
                indent=2,
                default=str,
            )
        )

    def export(state):
        if lcfg is not None:
            from smedjan.peft import save_adapter

            d = save_adapter(out / "adapter", state.params, lcfg, base_model_name_or_path=source)
            _copy_tokenizer(folder, d)
            print(f"saved PEFT adapter {d} (base {source})")
            return {"adapter_dir": str(d)}
        d = save_hf(out / "hf", cfg, state.params, tokenizer_dir=folder)
        print(f"saved Hugging Face folder {d}")
        return {"hf_dir": str(d)}

    def check_meta(meta):
        was = meta.get("finetune", {})
        if (
            was.get("objective", name) != name
            or was.get("model", ft.model) != ft.model
            or was.get("lora") != (lcfg is not None)
        ):
            raise TrainError(
                "--resume: the checkpoint belongs to another fine-tuning run (objective, model or LoRA differ)"
            )

    job = Job(
        model_cfg=cfg,
        init=init,
        batch=sampler.batch,
        val=eval_rows(val, rc.batch_size, rc.log.eval_batches) if val is not None else [],
        export=export,
        objective=objective,
        lora=lcfg,
        frozen=frozen or None,
        meta={"finetune": {"objective": name, "model": ft.model, "lora": lcfg is not None, "data": list(ft.data)}},
        check_meta=check_meta,
        tokens_per_step=tokens_per_step,
        describe=f"{name}{' + LoRA r=' + str(lcfg.rank) if lcfg else ''}, {len(train['inputs'])} training rows",
    )
    return fit(job, rc)


def merge_adapter(base: str, adapter: str, out: str, dtype=jnp.bfloat16) -> Path:
    """A plain HF folder with the adapter merged into the base weights (W + s·B·A)."""
    from smedjan.model.lora import merge
    from smedjan.peft import load_adapter

    cfg, params, _, folder = load_model(base)
    try:
        adapters, lcfg = load_adapter(adapter, cfg)
    except CheckpointError as e:
        raise FinetuneError(str(e)) from None
    return save_hf(out, cfg, merge(params, adapters, lcfg), tokenizer_dir=folder, dtype=dtype)

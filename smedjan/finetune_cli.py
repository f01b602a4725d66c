"""`smedjan sft`, `smedjan dpo`, `smedjan distill` and `smedjan merge`: thin flags over smedjan.finetune.

    smedjan sft MODEL --data chat.jsonl --out runs/sft [--lora] [--no-pack]
    smedjan dpo MODEL --data pairs.jsonl --out runs/dpo --beta 0.1 [--loss-type ipo] [--lora]
    smedjan distill --teacher BIG --student SMALL|--size tiny --data text.jsonl --out runs/kd
    smedjan merge BASE ADAPTER --out merged/

The optimisation and run flags are `smedjan train`'s (smedjan.runconfig) (progress, validation, log, checkpoints, --resume,
--mesh); the defaults below suit fine-tuning (smaller learning rate, no weight decay).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from smedjan import runconfig
from smedjan.errors import UserError
from smedjan.info import add_model_args

FINETUNE_DEFAULTS = dict(
    steps=200,
    batch_size=8,
    seq_len=512,
    lr=2e-5,
    warmup_steps=10,
    weight_decay=0.0,
    eval_every=50,
    eval_batches=10,
    save_every=100,
)
LORA_LR = 2e-4


def _options(args, objective_cls):
    """(RunConfig, FinetuneConfig, objective) from defaults < --recipe < flags; a recipe may hold any of the
    three's keys (flat) and an "objective" object."""
    from smedjan.finetune import FinetuneConfig

    ft_fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    obj_fields = {f.name for f in dataclasses.fields(objective_cls)} - {"teacher_cfg"}
    recipe = runconfig.load_recipe(args.recipe) if getattr(args, "recipe", None) else {}
    recipe = {k.replace("-", "_"): v for k, v in recipe.items()}
    if isinstance(recipe.get("objective"), dict):
        recipe.update({k: v for k, v in recipe.pop("objective").items() if k != "name"})
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command", "recipe")}
    merged = {**recipe, **given}
    ft = {k: merged.pop(k) for k in list(merged) if k in ft_fields}
    obj = {k: merged.pop(k) for k in list(merged) if k in obj_fields}
    merged.pop("summary_json", None)
    defaults = dict(FINETUNE_DEFAULTS, **({"lr": LORA_LR} if ft.get("lora") else {}))
    rc = runconfig.from_dict(defaults).merge(merged, source="options")
    for k in ("data", "val_data"):
        if k in ft:
            ft[k] = tuple(ft[k] if isinstance(ft[k], (list, tuple)) else [ft[k]])
    return rc, FinetuneConfig(**ft), objective_cls(**obj)


def _run(args, objective_cls) -> int:
    from smedjan.finetune import finetune
    from smedjan.text import DataError
    from smedjan.train.checkpointing import CheckpointError
    from smedjan.train.loop import TrainError

    try:
        rc, ft, objective = _options(args, objective_cls)
        summary = finetune(rc, ft, objective)
    except (TrainError, DataError, CheckpointError, ValueError, TypeError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(str(e)) from None
    if getattr(args, "summary_json", None):
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    return 0


def _add_common(p, model_arg=True) -> None:
    p.add_argument("--recipe", help="JSON file of options (keys as the flags, with underscores); flags override it")
    if model_arg:
        p.add_argument("model", help="HF folder or hub id to fine-tune")
    g = p.add_argument_group("fine-tuning data")
    g.add_argument("--data", nargs="+", required=True, help="JSONL/JSON (or .gz) files: chat, Alpaca, text, pairs")
    g.add_argument("--val-data", nargs="+", default=None, help="validation files (default: hold out --val-fraction)")
    g.add_argument("--val-fraction", type=float, default=None, help="share of --data held out (default 0.05)")
    g.add_argument("--skip-bad-rows", action="store_true", default=None, help="count and skip malformed rows")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", action="store_true", default=None, help="train LoRA adapters on a frozen base")
    g.add_argument("--lora-rank", type=int, default=None, help="(default 16)")
    g.add_argument("--lora-alpha", type=float, default=None, help="scale = alpha / rank (default 32)")
    g.add_argument("--lora-dropout", type=float, default=None, help="(default 0)")
    g.add_argument("--lora-targets", default=None, help="all-linear (default), attn, mlp, or a list: q_proj,v_proj,...")
    g.add_argument(
        "--base-dtype",
        choices=["auto", "bf16", "fp32"],
        default=None,
        help="the frozen base's storage (auto: bf16 on GPU)",
    )
    runconfig.add_arguments(p, add_model_args, skip=("data",) if not model_arg else ("data", "model"))
    p.add_argument("--summary-json", help="write the run summary here")


def _run_sft(args) -> int:
    from smedjan.train.objectives.sft import SFT

    return _run(args, SFT)


def _run_dpo(args) -> int:
    from smedjan.train.objectives.dpo import DPO

    return _run(args, DPO)


def _run_distill(args) -> int:
    from smedjan.train.objectives.distill import Distill

    if bool(getattr(args, "model", None)) == bool(getattr(args, "size", None)):
        raise UserError("give exactly one of --student FOLDER and --size PRESET")
    args.student_size = args.size
    return _run(args, Distill)


def _run_merge(args) -> int:
    import jax.numpy as jnp

    from smedjan.finetune import merge_adapter

    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32, "fp16": jnp.float16}[args.dtype]
    out = merge_adapter(args.base, args.adapter, args.out, dtype=dtype)
    print(f"merged {args.adapter} into {args.base}: {out}")
    return 0


def register(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning of a HF checkpoint (full or --lora)",
        description=__doc__,
        formatter_class=fmt,
    )
    _add_common(p)
    p.add_argument("--no-pack", dest="pack", action="store_false", default=None, help="one example per row")
    p.set_defaults(func=_run_sft)

    p = sub.add_parser(
        "dpo", help="direct preference optimisation of a HF checkpoint", description=__doc__, formatter_class=fmt
    )
    _add_common(p)
    g = p.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=None, help="(default 0.1)")
    g.add_argument("--loss-type", choices=["sigmoid", "ipo"], default=None, help="(default sigmoid)")
    g.add_argument("--label-smoothing", type=float, default=None, help="conservative DPO's epsilon (default 0)")
    p.set_defaults(func=_run_dpo)

    p = sub.add_parser("distill", help="distil a teacher into a student", description=__doc__, formatter_class=fmt)
    _add_common(p, model_arg=False)
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", required=True, help="HF folder or hub id of the teacher")
    g.add_argument("--student", dest="model", default=None, help="HF folder of a pretrained student (or --size)")
    g.add_argument(
        "--alpha", type=float, default=None, help="weight of the KL term; 1-alpha on hard labels (default 0.5)"
    )
    g.add_argument("--temperature", type=float, default=None, help="(default 2.0)")
    g.add_argument("--no-pack", dest="pack", action="store_false", default=None, help="one example per row")
    p.set_defaults(func=_run_distill)

    p = sub.add_parser("merge", help="merge a PEFT LoRA adapter into its base: a plain HF folder")
    p.add_argument("base", help="HF folder or hub id of the base")
    p.add_argument("adapter", help="PEFT adapter folder")
    p.add_argument("--out", required=True, help="HF folder to write")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default="bf16")
    p.set_defaults(func=_run_merge)

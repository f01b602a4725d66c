"""`smedjan train` and `smedjan export-hf`.

Options come from three layers, later ones winning: the defaults of `smedjan.runconfig.RunConfig`,
a recipe JSON (`--recipe configs/main_job.json`; keys = option names with underscores, or nested
sections such as {"optim": {"lr": 1e-3}}), the command line.

`--corpus bundled` (or `--corpus FILE...`) runs the whole pipeline in one command: it trains a
tokenizer into RUN/tokenizer and prepares RUN/data when they are missing or stale, then trains.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smedjan import runconfig
from smedjan.config import ModelConfig
from smedjan.errors import UserError
from smedjan.info import add_model_args
from smedjan.text import bundled_corpus  # noqa: F401  (the packaged corpus, imported from here by tests)


def run_train(args: argparse.Namespace) -> int:
    from smedjan.tokenizer import TokenizerError
    from smedjan.train.checkpointing import CheckpointError
    from smedjan.train.loop import train

    rc = runconfig.from_args(args)
    if not rc.data.corpus and not (rc.data.dataset and rc.data.tokenizer):
        raise UserError("give --dataset and --tokenizer (or --corpus bundled|FILES to build both)")
    try:
        summary = train(rc)
    except (TokenizerError, CheckpointError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(str(e)) from None
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    return 0


def run_export(args: argparse.Namespace) -> int:
    import jax.numpy as jnp
    from safetensors import SafetensorError

    from smedjan.checkpoint import save_hf
    from smedjan.train.record import run_record

    try:
        params, cfg, tok_dir, step = load_run_params(args.run_dir, args.step)
    except (ValueError, KeyError, TypeError, SafetensorError) as e:  # damaged meta.json or state file
        raise UserError(f"{args.run_dir}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32, "fp16": jnp.float16}[args.dtype]
    out = save_hf(args.output, cfg, params, tokenizer_dir=tok_dir, dtype=dtype, run_info=run_record(args.run_dir, step))
    print(f"exported step {step} of {args.run_dir} to {out}")
    return 0


def load_run_params(run_dir: str | Path, step: int | None = None) -> tuple[dict, ModelConfig, Path | None, int]:
    """(params as numpy, ModelConfig, tokenizer folder or None, step) of a run's checkpoint."""
    from smedjan.config import ConfigError
    from smedjan.model.transformer import param_shapes
    from smedjan.train import checkpointing as ck

    run_dir = Path(run_dir)
    found = ck.checkpoints(run_dir)
    if not found:
        raise UserError(f"{run_dir}: no checkpoints (expected {run_dir}/checkpoints/step_*)")
    if step is None:
        step, path = found[-1]
    else:
        match = [p for s, p in found if s == step]
        if not match:
            raise UserError(f"{run_dir}: no checkpoint for step {step}; have {[s for s, _ in found]}")
        path = match[0]
    try:
        meta = ck.check_checkpoint(path)
        if not isinstance(meta.get("model_config"), dict):
            raise UserError(f"{path / ck.META}: no 'model_config' object")
        cfg = ModelConfig.from_hf_dict(meta["model_config"])
        params = ck.load_params(path, param_shapes(cfg), verify=False)
    except (ck.CheckpointError, ConfigError, TypeError) as e:
        raise UserError(str(e) if isinstance(e, ck.CheckpointError) else f"{path / ck.META}: {e}") from None
    tok_dir = run_dir / "tokenizer"
    return params, cfg, (tok_dir if (tok_dir / "tokenizer.json").is_file() else None), step


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pre-train a model on a prepared dataset (or --corpus bundled)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", help="JSON file of options (keys as below, with underscores); flags override it")
    runconfig.add_arguments(p, add_model_args)
    p.add_argument("--summary-json", default=None, help="write the run summary here")
    p.set_defaults(func=run_train)
    e = sub.add_parser("export-hf", help="write a training run's checkpoint as a Hugging Face folder")
    e.add_argument("run_dir", help="the run folder given to `smedjan train --out`")
    e.add_argument("--output", required=True, help="HF folder to write")
    e.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    e.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default="bf16")
    e.set_defaults(func=run_export)

"""`smedjan train` and `smedjan export-hf`.

Options come from three layers, later ones winning: `RunConfig` defaults, a recipe JSON
(`--recipe configs/main_job.json`, keys = option names with underscores), the command line.

`--corpus bundled` (or `--corpus FILE...`) runs the whole pipeline in one command: it trains a
tokenizer into RUN/tokenizer and prepares RUN/data when they are missing or stale, then trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from smedjan.errors import UserError
from smedjan.info import add_model_args, model_overrides
from smedjan.text import DataError

S = argparse.SUPPRESS
MODEL_ARG_NAMES = ("dim", "layers", "heads", "kv_heads", "ffn_dim", "vocab_size", "max_seq_len")


def bundled_corpus() -> Path:
    """The packaged Shakespeare corpus (smedjan/corpus/tinyshakespeare.txt.gz)."""
    return Path(__file__).resolve().parents[1] / "corpus" / "tinyshakespeare.txt.gz"


def _load_recipe(path: str) -> dict:

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--recipe {path}: no such file")
    try:
        recipe = json.loads(p.read_text())
    except ValueError as e:  # JSON or UTF-8
        raise UserError(f"--recipe {path}: not valid JSON ({e})") from None
    if not isinstance(recipe, dict):
        raise UserError(f"--recipe {path}: expected a JSON object")
    return {k.replace("-", "_"): v for k, v in recipe.items() if not k.startswith("_")}


def resolve_options(args) -> tuple[dict, dict]:
    """(RunConfig kwargs, pipeline options) from defaults < recipe < command line."""
    from smedjan.train.loop import RunConfig

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "recipe", "summary_json")}
    merged = _load_recipe(args.recipe) if getattr(args, "recipe", None) else {}
    merged.update({k: v for k, v in given.items() if v is not None})
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    pipeline_keys = {"corpus", "tokenizer_vocab", "val_fraction", "text_field", "split"}
    overrides = dict(merged.pop("model_overrides", {}) or {})
    ns = argparse.Namespace(**{k: merged.pop(k, None) for k in MODEL_ARG_NAMES})
    overrides.update(model_overrides(ns))
    pipeline = {k: merged.pop(k) for k in list(merged) if k in pipeline_keys}
    unknown = sorted(k for k in merged if k not in fields)
    if unknown:
        raise UserError(f"unknown option(s) in recipe: {unknown}")
    merged["model_overrides"] = overrides
    return merged, pipeline


def prepare_corpus(
    out: Path, corpus, tokenizer_vocab: int, val_fraction: float, text_field: str, split: str, tokenizer: str | None
) -> tuple[str, str]:
    """Tokenizer + prepared data for `--corpus`, rebuilt only when missing or stale."""
    from smedjan.data import TokenDataset, prepare
    from smedjan.tokenizer import Tokenizer, train_tokenizer

    inputs = [
        str(bundled_corpus()) if c == "bundled" else c for c in ([corpus] if isinstance(corpus, str) else list(corpus))
    ]
    tok_dir = Path(tokenizer) if tokenizer else out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        if tokenizer:
            raise ValueError(f"{tokenizer}: no tokenizer.json")
        print(f"training a {tokenizer_vocab}-token BPE tokenizer on {', '.join(inputs)} -> {tok_dir}", file=sys.stderr)
        train_tokenizer(inputs, tok_dir, tokenizer_vocab, text_field=text_field, split=split)
    data_dir = out / "data"
    fresh = False
    try:
        ds = TokenDataset(data_dir)
        fresh = (
            ds.tokenizer_hash == Tokenizer.from_dir(tok_dir).hash
            and ds.header.get("inputs") == [str(Path(i)) for i in inputs]
            and ds.header.get("val_fraction") == val_fraction
        )
    except ValueError:
        pass
    if not fresh:
        print(f"preparing {data_dir}", file=sys.stderr)
        h = prepare(inputs, tok_dir, data_dir, val_fraction=val_fraction, text_field=text_field, split=split)
        print(
            f"  {h['documents']} documents, {h['tokens']:,} tokens (val {h['splits']['val']['tokens']:,})",
            file=sys.stderr,
        )
    return str(data_dir), str(tok_dir)


def run_train(args) -> int:
    from smedjan.tokenizer import TokenizerError
    from smedjan.train.checkpointing import CheckpointError
    from smedjan.train.loop import RunConfig, TrainError, train

    opts, pipeline = resolve_options(args)
    try:
        if pipeline.get("corpus"):
            out = Path(opts.get("out", RunConfig.out))
            out.mkdir(parents=True, exist_ok=True)
            opts["dataset"], opts["tokenizer"] = prepare_corpus(
                out,
                pipeline["corpus"],
                int(pipeline.get("tokenizer_vocab", 4096)),
                float(pipeline.get("val_fraction", 0.05)),
                pipeline.get("text_field", "text"),
                pipeline.get("split", "auto"),
                opts.get("tokenizer"),
            )
        if not opts.get("dataset") or not opts.get("tokenizer"):
            raise UserError("give --dataset and --tokenizer (or --corpus bundled|FILES to build both)")
        rc = RunConfig(**opts)
        summary = train(rc)
    except (TrainError, DataError, TokenizerError, CheckpointError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(str(e)) from None
    if getattr(args, "summary_json", None):
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    return 0


def add_train_args(p) -> None:
    p.add_argument("--recipe", help="JSON file of options (keys as below, with underscores); flags override it")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=S, help="prepared dataset folder (smedjan prepare)")
    g.add_argument("--tokenizer", default=S, help="tokenizer folder; must be the one the dataset was prepared with")
    g.add_argument(
        "--corpus",
        nargs="+",
        default=S,
        help="'bundled' (packaged Shakespeare) or text files: train tokenizer + prepare into --out first",
    )
    g.add_argument("--tokenizer-vocab", type=int, default=S, help="with --corpus: BPE vocab size (default 4096)")
    g.add_argument("--val-fraction", type=float, default=S, help="with --corpus: held-out share of documents")
    g.add_argument("--text-field", default=S, help="with --corpus: JSONL field holding the text")
    g.add_argument(
        "--split",
        choices=["auto", "line", "blank", "file"],
        default=S,
        help="with --corpus: document boundaries in .txt files (see smedjan prepare)",
    )
    g.add_argument("--stream", action="store_true", default=S, help="read tokens through np.memmap")
    g = p.add_argument_group("model")
    g.add_argument("--size", default=S, help="preset (tiny, small, medium, 125m, ...) or config.json / folder")
    add_model_args(g)
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=S)
    g.add_argument("--batch-size", type=int, default=S, help="global batch (sequences per optimizer step)")
    g.add_argument("--seq-len", type=int, default=S)
    g.add_argument("--grad-accum", type=int, default=S, help="micro-batches per step")
    g.add_argument("--lr", type=float, default=S)
    g.add_argument("--min-lr-ratio", type=float, default=S)
    g.add_argument("--warmup-steps", type=int, default=S)
    g.add_argument("--schedule", choices=["cosine", "wsd", "constant"], default=S)
    g.add_argument("--decay-fraction", type=float, default=S, help="wsd: share of steps spent decaying")
    g.add_argument("--weight-decay", type=float, default=S)
    g.add_argument("--b1", type=float, default=S)
    g.add_argument("--b2", type=float, default=S)
    g.add_argument("--clip-norm", type=float, default=S)
    g.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default=S,
        help="bf16 compute over fp32 master weights, or fp32 (auto: bf16 on GPU, fp32 on CPU)",
    )
    g.add_argument("--remat", choices=["auto", "none", "full", "dots"], default=S)
    g.add_argument("--attn-impl", choices=["auto", "xla", "cudnn", "pallas"], default=S)
    g.add_argument("--loss-chunk", type=int, default=S, help="tokens per chunk of the fused cross-entropy")
    g.add_argument("--seed", type=int, default=S)
    g = p.add_argument_group("run")
    g.add_argument("--out", default=S, help="run folder (checkpoints, log.jsonl, hf/)")
    g.add_argument("--resume", action="store_true", default=S, help="continue from the newest checkpoint in --out")
    g.add_argument(
        "--strict-resume",
        action="store_true",
        default=S,
        help="with --resume: stop when the newest checkpoint is damaged instead of falling back to an older one",
    )
    g.add_argument("--stop-after", type=int, default=S, help="stop (with a checkpoint) after this many steps")
    g.add_argument("--eval-every", type=int, default=S)
    g.add_argument("--eval-batches", type=int, default=S)
    g.add_argument("--log-every", type=int, default=S)
    g.add_argument("--save-every", type=int, default=S)
    g.add_argument("--keep", type=int, default=S, help="checkpoints to keep")
    g.add_argument("--mesh", default=S, help="e.g. data=2,fsdp=4 (default: all devices on data)")
    g.add_argument(
        "--distributed",
        action="store_true",
        default=S,
        help="multi-host: jax.distributed.initialize() (see smedjan.sharding)",
    )
    g.add_argument("--peak-flops", type=float, default=S, help="total peak FLOP/s for MFU on unknown hardware")
    g.add_argument("--samples", type=int, default=S, help="print this many sampled texts at the end")
    g.add_argument("--sample-tokens", type=int, default=S)
    g.add_argument("--sample-prompt", default=S)
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S)
    g.add_argument("--no-export", dest="export", action="store_false", default=S, help="skip writing RUN/hf at the end")
    g.add_argument("--summary-json", default=None, help="write the run summary here")


def run_export(args) -> int:
    import jax.numpy as jnp
    from safetensors import SafetensorError

    from smedjan.checkpoint import save_hf

    try:
        params, cfg, tok_dir, step = load_run_params(args.run_dir, args.step)
    except (ValueError, KeyError, TypeError, SafetensorError) as e:  # damaged meta.json or state file
        raise UserError(f"{args.run_dir}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32, "fp16": jnp.float16}[args.dtype]
    out = save_hf(args.output, cfg, params, tokenizer_dir=tok_dir, dtype=dtype)
    print(f"exported step {step} of {args.run_dir} to {out}")
    return 0


def load_run_params(run_dir, step: int | None = None):
    """(params as numpy, ModelConfig, tokenizer folder or None, step) of a run's checkpoint."""
    from smedjan.config import ConfigError, ModelConfig
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


def _show_defaults(p) -> None:
    """Flags default to SUPPRESS (so a recipe can fill them): print RunConfig's defaults in --help."""
    from smedjan.train.loop import RunConfig

    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
    for action in p._actions:
        if action.dest in defaults and action.help is not argparse.SUPPRESS and defaults[action.dest] not in ("", None):
            action.help = f"{action.help or ''} (default: {defaults[action.dest]})".strip()


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="pre-train a model on a prepared dataset (or --corpus bundled)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_args(p)
    _show_defaults(p)
    p.set_defaults(func=run_train)
    e = sub.add_parser("export-hf", help="write a training run's checkpoint as a Hugging Face folder")
    e.add_argument("run_dir", help="the run folder given to `smedjan train --out`")
    e.add_argument("--output", required=True, help="HF folder to write")
    e.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    e.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default="bf16")
    e.set_defaults(func=run_export)

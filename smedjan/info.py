"""`smedjan info PATH|PRESET`: config, parameter count and training memory."""

from __future__ import annotations

import argparse
import json

from smedjan import runconfig
from smedjan.config import ConfigError, human, memory_report, resolve_config
from smedjan.errors import UserError


def add_model_args(p: argparse._ActionsContainer) -> None:
    """Custom-shape flags shared by every command that builds a model from a preset."""
    p.add_argument("--dim", type=int, help="hidden size")
    p.add_argument("--layers", type=int, help="number of layers")
    p.add_argument("--heads", type=int, help="attention heads")
    p.add_argument("--kv-heads", type=int, help="key/value heads (GQA/MQA; default: --heads)")
    p.add_argument("--ffn-dim", type=int, help="SwiGLU intermediate size")
    p.add_argument("--vocab-size", type=int, help="vocabulary size")
    p.add_argument("--max-seq-len", type=int, help="max_position_embeddings")


def model_overrides(args: argparse.Namespace) -> dict:
    """config.json overrides from the parsed --dim/--layers/... flags."""
    return runconfig.model_overrides(vars(args))


def run(args: argparse.Namespace) -> int:

    try:
        cfg = resolve_config(args.model, **model_overrides(args))
    except (ConfigError, TypeError) as e:
        raise UserError(str(e)) from None
    n = cfg.num_params()
    mem = memory_report(cfg)
    if args.json:
        print(json.dumps({"config": cfg.to_hf_dict(), "num_params": n, **mem}, indent=2))
        return 0
    print(json.dumps(cfg.to_hf_dict(), indent=2))
    print(f"parameters: {n:,} ({human(n)})")
    print(
        f"memory (fp32 master weights + AdamW): params {mem['params_gib']:.3f} GiB, "
        f"grads {mem['grads_gib']:.3f} GiB, optimizer {mem['optimizer_gib']:.3f} GiB; "
        f"bf16 inference weights {mem['bf16_inference_gib']:.3f} GiB"
    )
    print(
        f"training FLOPs/token at seq {cfg.max_position_embeddings}: "
        f"{cfg.flops_per_token(cfg.max_position_embeddings):.3e}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a model's config, parameter count and memory")
    p.add_argument("model", help="preset name (tiny, small, medium, 125m, 350m, 1b, 3b, 6.5b) or checkpoint folder")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)

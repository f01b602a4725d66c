"""`smedjan` command line: one subcommand per pipeline stage.

Each stage's module registers its own parser (`register(subparsers)`), so this file
stays a table of contents and `smedjan --help` lists the whole pipeline.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from smedjan import hardware
from smedjan.errors import UserError

# (module, one-line help) in pipeline order; each module defines register(subparsers).
STAGES = [
    "smedjan.info",
    "smedjan.tokenizer",
    "smedjan.data",
    "smedjan.train.cli",
    "smedjan.finetune_cli",
    "smedjan.quant.cli",
    "smedjan.infer.cli",
    "smedjan.serve.cli",
    "smedjan.bench",
    "smedjan.eval.perplexity",
    "smedjan.export.cli",
    "smedjan.convert.cli",
    "smedjan.hub",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smedjan", description="The smithy for language models, in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in STAGES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The decode steps donate their state; on CPU some buffers cannot be reused and jax says so at every
    # compile. The program entry point, not an import, decides what the user sees.
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if hardware.metal_installed():  # elsewhere jax starts lazily (multi-host runs must initialise first)
        hardware.start_platform()
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError) as e:  # OSError: a path the user gave that cannot be read or written
        message = " ".join(str(e).split())  # one line, whatever the message's source put in it
        print(f"smedjan {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

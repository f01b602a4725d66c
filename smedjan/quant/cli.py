"""`smedjan quantize`: a HF folder in, a weight-only quantized folder out (smedjan/quant/quantize.py)."""

from __future__ import annotations

import sys

from smedjan.quant.quantize import METHODS, quantize_folder
from smedjan.quant.qweight import SCHEMES


def _cmd_quantize(args) -> int:
    from tqdm import tqdm

    bar = None

    def progress(i):
        nonlocal bar
        if bar is None:
            bar = tqdm(desc="awq scale search", unit="layer", file=sys.stderr)
        bar.update(1)

    out = quantize_folder(
        args.model,
        args.out,
        args.scheme,
        group_size=args.group_size,
        method=args.method,
        calib=args.calib,
        calib_rows=args.calib_rows,
        calib_seq_len=args.calib_seq_len,
        lm_head=args.lm_head,
        progress=progress,
    )
    if bar is not None:
        bar.close()
    print(f"wrote {out} ({args.scheme}, {args.method})")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="weight-only int8/int4 quantization of a model's linears (RTN or AWQ)",
        description="Quantize every linear of the layers (optionally the LM head): int8 per output channel or "
        "int4 per group of input channels (two codes a byte). The folder loads in smedjan's generate / serve / "
        "chat / bench / eval, which run the Pallas int8/int4 kernels on GPU.",
    )
    p.add_argument("model", help="HF folder or hub id")
    p.add_argument("--scheme", choices=SCHEMES, required=True)
    p.add_argument("--group-size", type=int, default=128, help="int4: input channels per scale (default 128)")
    p.add_argument("--method", choices=METHODS, default="rtn", help="rtn: round to nearest; awq: activation-aware")
    p.add_argument("--calib", help="calibration text (.txt/.jsonl/.gz) for --method awq")
    p.add_argument("--calib-rows", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")
    p.add_argument("--lm-head", action="store_true", help="also quantize an untied LM head")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cmd_quantize)

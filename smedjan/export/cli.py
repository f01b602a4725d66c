"""`smedjan export MODEL --format gguf|onnx --out PATH`: a HF folder into another runtime's format."""

from __future__ import annotations

from smedjan.checkpoint import CheckpointError


def run_export(args) -> int:
    from smedjan.errors import UserError

    try:
        if args.format == "gguf":
            from smedjan.export.gguf import export_gguf

            types = export_gguf(args.model, args.out, args.type)
            kinds = sorted(set(types.values()))
            print(f"wrote {args.out}: {len(types)} tensors ({', '.join(kinds)}), tokenizer embedded")
        else:
            from smedjan.export.onnx import export_onnx

            out = export_onnx(args.model, args.out)
            print(f"wrote {out}/onnx/model.onnx (+ config and tokenizer files)")
    except CheckpointError as e:
        raise UserError(str(e)) from None
    return 0


def register(sub) -> None:
    from smedjan.export.gguf import GGUF_TYPES

    p = sub.add_parser("export", help="write a checkpoint as GGUF (llama.cpp) or ONNX (onnxruntime, the browser)")
    p.add_argument("model", help="HF folder (or hub repo id)")
    p.add_argument("--format", required=True, choices=["gguf", "onnx"])
    p.add_argument("--out", required=True, help="the .gguf file, or the folder for onnx")
    p.add_argument("--type", default="f16", choices=GGUF_TYPES, help="GGUF tensor type (default f16; onnx is float32)")
    p.set_defaults(func=run_export)

"""`smedjan convert llama2c|gguf`: one subcommand per source format, each writing a HF folder."""

from __future__ import annotations


def register(sub) -> None:
    def run_llama2c(args):
        from smedjan.convert.llama2c import convert

        print(convert(args.checkpoint, args.tokenizer, args.output))

    def run_gguf(args):
        from smedjan.convert.gguf import gguf_to_hf

        print(gguf_to_hf(args.file, args.output))

    p = sub.add_parser("convert", help="convert llama2.c or GGUF models into Hugging Face folders")
    fmt = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    q = fmt.add_parser("llama2c", help="a llama2.c checkpoint .bin and its tokenizer .bin")
    q.add_argument("--checkpoint", required=True, help="llama2.c model .bin (version-0 export)")
    q.add_argument("--tokenizer", required=True, help="llama2.c tokenizer .bin (e.g. tok512.bin)")
    q.add_argument("--output", required=True)
    q.set_defaults(func=run_llama2c)
    q = fmt.add_parser("gguf", help="a GGUF file (f32/f16/bf16/q8_0/q4_0/k-quants; llama, qwen2, qwen3)")
    q.add_argument("file")
    q.add_argument("--output", required=True)
    q.set_defaults(func=run_gguf)

"""`smedjan generate`: complete a prompt with a checkpoint, and the loading helpers the server shares."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp

from smedjan.backend import settings
from smedjan.config import ModelConfig
from smedjan.errors import UserError
from smedjan.infer.runner import eos_list, generate
from smedjan.infer.sampling import SamplingParams
from smedjan.infer.speculative import Speculation
from smedjan.infer.stream import decode_text


def load_tokenizer(folder):
    """smedjan.tokenizer.Tokenizer for a folder holding tokenizer.json (+ tokenizer_config.json)."""
    from smedjan.tokenizer import Tokenizer

    return Tokenizer.from_dir(folder)


def stop_ids_for(folder, cfg: ModelConfig, tokenizer) -> list[int]:
    """End-of-sequence ids: config.json, generation_config.json and the tokenizer's eos, merged."""
    ids = set(eos_list(cfg.eos_token_id))
    gen = Path(folder) / "generation_config.json"
    if gen.is_file():
        try:
            ids.update(eos_list(json.loads(gen.read_text()).get("eos_token_id")))
        except (json.JSONDecodeError, TypeError, ValueError):
            pass
    if tokenizer is not None:
        ids.update(getattr(tokenizer, "stop_ids", None) or [])
        if getattr(tokenizer, "eos_id", None) is not None:
            ids.add(int(tokenizer.eos_id))
    return sorted(i for i in ids if 0 <= i < cfg.vocab_size)


def load_model(model: str, dtype=None):
    """(folder, cfg, params, tokenizer) for a checkpoint folder or hub id."""
    from smedjan.checkpoint import load_hf, resolve_path

    folder = resolve_path(model)
    cfg, params = load_hf(folder, dtype=dtype)
    tokenizer = load_tokenizer(folder)
    return folder, cfg, params, tokenizer


def add_sampling_args(p):
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="compute dtype (default: bfloat16 on GPU, float32 on CPU)",
    )


# SamplingParams names its fields as the OpenAI API does; on the command line the flag is the name.
SAMPLING_FLAGS = {
    "max_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
    "seed": "--seed",
}


def check_sampling_args(args) -> None:
    """The sampling flags checked before any model loads; the error names the flag."""
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    try:
        params.validate()
    except ValueError as e:
        name, message = e.args
        flag = SAMPLING_FLAGS.get(name, name)
        raise UserError(flag + message.removeprefix(name)) from None


def load_adapters(specs, cfg, dtype) -> dict:
    """{name: (adapters, LoraConfig)} from `--lora name=FOLDER` values (PEFT adapter folders)."""
    from smedjan.checkpoint import CheckpointError
    from smedjan.model.lora import LoraError
    from smedjan.peft import load_adapter

    out = {}
    for spec in specs or []:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"--lora takes NAME=ADAPTER_FOLDER, got {spec!r}")
        if name in out:
            raise UserError(f"--lora: the name {name!r} is given twice")
        try:
            out[name] = load_adapter(folder, cfg, dtype)
        except (CheckpointError, LoraError, FileNotFoundError, OSError) as e:
            raise UserError(f"--lora {name}: {e}") from None
    return out


def add_speculation_args(p):
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--draft", metavar="MODEL", help="a smaller draft model sharing the tokenizer (folder or hub id)")
    g.add_argument(
        "--prompt-lookup", action="store_true", help="draft-free speculation: propose what followed the last n-gram"
    )
    g.add_argument("--spec-k", type=int, default=4, help="tokens proposed per target step (default 4)")
    g.add_argument("--spec-ngram", type=int, default=3, help="prompt lookup: longest n-gram matched (default 3)")


def speculation_from_args(args):
    """(Speculation or None, (draft params, draft cfg) or None) from the CLI flags; loads the draft."""
    from smedjan.checkpoint import CheckpointError

    if not args.draft and not args.prompt_lookup:
        return None, None
    if args.draft and args.prompt_lookup:
        raise UserError("--draft and --prompt-lookup are two kinds of speculation: pick one")
    try:
        spec = Speculation("draft" if args.draft else "ngram", k=args.spec_k, ngram=args.spec_ngram).validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    if not args.draft:
        return spec, None
    try:
        _, dcfg, dparams, _ = load_model(args.draft, dtype=default_dtype(args.dtype))
    except (CheckpointError, FileNotFoundError, OSError) as e:
        raise UserError(f"--draft: {e}") from None
    return spec, (dparams, dcfg)


def default_dtype(name: str | None, backend=None):
    if name:
        return jnp.dtype(name)
    return jnp.bfloat16 if (backend or settings()).platform != "cpu" else jnp.float32


def _cmd_generate(args):
    from smedjan.checkpoint import CheckpointError

    check_sampling_args(args)
    try:
        folder, cfg, params, tok = load_model(args.model, dtype=default_dtype(args.dtype))
    except (CheckpointError, FileNotFoundError, OSError) as e:
        raise UserError(str(e)) from None
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        ids = tok.encode(text, add_bos=False)
    else:
        ids = tok.encode(args.prompt) if args.no_bos else tok.encode_prompt(args.prompt)
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    room = cfg.max_position_embeddings - len(ids)
    if room < 1:
        raise UserError(f"the prompt has {len(ids)} tokens; the model's context is {cfg.max_position_embeddings}")
    speculation, draft = speculation_from_args(args)
    lora = None
    if args.lora:
        lora = load_adapters([f"adapter={args.lora}"], cfg, default_dtype(args.dtype))["adapter"]
    stats = {}
    try:
        out = generate(
            params,
            cfg,
            [ids],
            max_new_tokens=min(args.max_new_tokens, room),
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            eos_id=stop_ids_for(folder, cfg, tok),
            stop_strings=args.stop or None,
            tokenizer=tok,
            speculation=speculation,
            draft=draft,
            stats=stats,
            lora=lora,
        )[0]
    except ValueError as e:
        raise UserError(str(e)) from None
    if stats:
        print(
            f"speculative decoding: {stats['accepted']}/{stats['proposed']} proposed tokens accepted "
            f"({100 * stats['acceptance_rate']:.0f}%), {stats['tokens_per_round']:.2f} tokens per target step",
            file=sys.stderr,
        )
    text = decode_text(tok, out)
    if args.stop:
        for s in args.stop:
            if s in text:
                text = text[: text.index(s)]
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


def register(subparsers):
    p = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint",
        description="Complete a prompt with a checkpoint folder (smedjan or Hugging Face).",
    )
    p.add_argument("model", help="checkpoint folder or hub repo id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument(
        "--no-bos", action="store_true", help="encode the prompt without the tokenizer's special tokens (no BOS)"
    )
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--lora", metavar="FOLDER", help="apply a LoRA adapter (PEFT folder) without merging it")
    add_sampling_args(p)
    add_speculation_args(p)
    p.set_defaults(func=_cmd_generate)

"""Perplexity of a model on a text file: the whole text tokenized once, cut into back-to-back windows of
`ctx` tokens, each token predicted from the tokens before it in its window (the first of a window is
not scored), perplexity = exp(mean negative log-likelihood over the scored tokens).

    smedjan perplexity MODEL --data ../shared/data/eval/wikitext-2-test.txt [--ctx 256] [--max-tokens N]

Any folder smedjan loads works, quantized ones included (their linears run the quantized weights).
"""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from smedjan.config import ModelConfig
from smedjan.errors import UserError
from smedjan.model.transformer import forward


@partial(jax.jit, static_argnames=("cfg", "compute_dtype"))
def _window_nll(params, tokens, cfg: ModelConfig, compute_dtype):
    """Next-token NLL summed per window of tokens [B, S] (targets tokens[:, 1:]) -> [B] fp32."""
    logits = forward(params, tokens[:, :-1], cfg, compute_dtype=compute_dtype).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1), axis=(1, 2))


def perplexity(
    params, cfg: ModelConfig, ids, *, ctx: int = 256, batch: int = 8, compute_dtype=None, progress=None
) -> dict:
    """{"perplexity", "nll", "tokens" (scored), "windows"} over token ids cut into windows of `ctx`."""
    ids = np.asarray(ids, np.int32)
    if ctx < 2 or ctx > cfg.max_position_embeddings:
        raise UserError(f"--ctx must be in [2, {cfg.max_position_embeddings}] for this model, got {ctx}")
    n = len(ids) // ctx
    if n == 0:
        raise UserError(f"text too short: {len(ids)} tokens, fewer than one window of {ctx}")
    windows = ids[: n * ctx].reshape(n, ctx)
    total = 0.0
    for i in range(0, n, batch):
        chunk = windows[i : i + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])  # one compile
        total += float(np.sum(np.asarray(_window_nll(params, jnp.asarray(padded), cfg, compute_dtype))[: len(chunk)]))
        if progress is not None:
            progress(len(chunk))
    scored = n * (ctx - 1)
    return {"perplexity": math.exp(total / scored), "nll": total / scored, "tokens": scored, "windows": n}


def _cmd_perplexity(args) -> int:
    from tqdm import tqdm

    from smedjan.infer.cli import default_dtype, load_model

    path = Path(args.data)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    folder, cfg, params, tok = load_model(args.model, dtype=default_dtype(args.dtype))
    ids = tok.encode(path.read_text(encoding="utf-8", errors="replace"))
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    dtype = params["model.embed_tokens.weight"].dtype
    with tqdm(total=len(ids) // args.ctx, desc="perplexity", unit="window", file=sys.stderr) as bar:
        r = perplexity(params, cfg, ids, ctx=args.ctx, batch=args.batch, compute_dtype=dtype, progress=bar.update)
    print(
        f"{folder}: perplexity {r['perplexity']:.3f} (nll {r['nll']:.4f}) over {r['tokens']:,} tokens "
        f"in {r['windows']} windows of {args.ctx}, {jnp.dtype(dtype).name}"
    )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("perplexity", help="perplexity of a model on a text file")
    p.add_argument("model", help="HF folder (float or `smedjan quantize`d) or hub id")
    p.add_argument("--data", required=True, help="text file, read whole (e.g. wikitext-2-test.txt)")
    p.add_argument("--ctx", type=int, default=256, help="window length in tokens (default 256)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (0: all)")
    p.add_argument("--dtype", default=None, help="compute dtype for float weights (default: bf16 on GPU, else fp32)")
    p.set_defaults(func=_cmd_perplexity)

"""Speculative decoding speed: batch-1 greedy tokens/s of plain decoding against speculation, same weights.

Three cases on a random-init target (default the 1b preset, bf16):

* prompt lookup (n-gram) on the target's own output: a random model's greedy text falls into loops,
  the case where prompt lookup shines (what it proposes is what was said before);
* a draft that agrees by construction: the draft is the target's first `--draft-layers` layers with
  the same embedding and head, and the target's other layers have zero output projections (o_proj,
  down_proj), so both compute the same function at their own cost: acceptance 100%, which measures
  the machinery at the speed-up a well-matched trained draft approaches;
* an independent random draft (the 125m preset): whatever it agrees on by chance (the output shows
  its acceptance rate), i.e. the overhead of a poorly matched draft.

Each case reports how many tokens equal plain greedy decoding before the first difference: the
verify step runs k + 1 tokens as one block (a GEMM and a multi-query attention) where plain decoding
runs one, so in bf16 a random model's near-tied logits can flip (the fp32 tests assert equality).
No trained draft/target pair exists on the benchmark machine, which is why the agreement is
constructed (and said so in the output).

    PYTHONPATH=. python3 benchmarks/speculative.py --preset 1b --new-tokens 256 --json $OUT/spec.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from smedjan.backend import settings
from smedjan.config import preset
from smedjan.infer import generate
from smedjan.infer.speculative import Speculation
from smedjan.model.transformer import init_params, prepare


def timed(fn, repeats):
    fn()  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--draft-preset", default="125m")
    ap.add_argument("--draft-layers", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    backend = settings()
    dtype = jnp.bfloat16 if backend.platform != "cpu" else jnp.float32
    cfg = preset(args.preset)
    params = init_params(cfg, jax.random.key(0), dtype)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt_len).tolist()
    n = args.new_tokens
    report = {"device": str(jax.devices()[0]), "preset": args.preset, "new_tokens": n, "k": args.k, "cases": {}}

    def run(w, spec=None, draft=None, stats=None):
        return generate(w, cfg, [prompt], max_new_tokens=n, speculation=spec, draft=draft, stats=stats)[0]

    def case(name, w, spec=None, draft=None, note="", plain=None):
        stats = {}
        t, toks = timed(lambda: run(w, spec, draft, stats), args.repeats)
        r = {"tokens_per_s": len(toks) / t, "tokens": len(toks), "note": note, **stats}
        if plain is not None:  # tokens equal to plain greedy decoding before the first difference
            same = next((i for i, (a, b) in enumerate(zip(toks, plain)) if a != b), min(len(toks), len(plain)))
            r["same_as_plain"] = same
            r["note"] = note = note + f" (= plain for {same}/{len(plain)} tokens)"
        report["cases"][name] = r
        print(
            f"{name:>22}: {r['tokens_per_s']:8.1f} tok/s  acceptance {100 * stats.get('acceptance_rate', 0):5.1f}%"
            f"  tokens/target step {stats.get('tokens_per_round', 1.0):.2f}  {note}",
            flush=True,
        )
        return toks

    # The target with layers past `draft_layers` turned into identities (zero output projections).
    L = "model.layers."
    dl = args.draft_layers
    ident = dict(params)
    for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        ident[L + name] = params[L + name].at[dl:].set(0)
    w = prepare(params, cfg, backend, dtype)
    w_ident = prepare(ident, cfg, backend, dtype)
    dcfg_self = cfg.replace(num_hidden_layers=dl)
    draft_self = {k: (v[:dl] if k.startswith(L) else v) for k, v in params.items()}
    dcfg_rand = preset(args.draft_preset, vocab_size=cfg.vocab_size)
    draft_rand = init_params(dcfg_rand, jax.random.key(1), dtype)
    del params, ident

    plain = case("plain", w)
    case("prompt lookup", w, Speculation("ngram", k=args.k), note="random target's own loops", plain=plain)
    plain_ident = case("plain (identity tail)", w_ident)
    case(
        "draft (agrees)",
        w_ident,
        Speculation("draft", k=args.k),
        (prepare(draft_self, dcfg_self, backend, dtype), dcfg_self),
        note=f"draft = first {dl} layers; agreement by construction",
        plain=plain_ident,
    )
    case(
        "draft (random 125m)",
        w,
        Speculation("draft", k=args.k),
        (prepare(draft_rand, dcfg_rand, backend, dtype), dcfg_rand),
        note="an independent random draft",
        plain=plain,
    )
    c = report["cases"]
    report["speedup"] = {
        "prompt_lookup": c["prompt lookup"]["tokens_per_s"] / c["plain"]["tokens_per_s"],
        "draft_agrees": c["draft (agrees)"]["tokens_per_s"] / c["plain (identity tail)"]["tokens_per_s"],
        "draft_random": c["draft (random 125m)"]["tokens_per_s"] / c["plain"]["tokens_per_s"],
    }
    print("speed-up over plain:", json.dumps({k: round(v, 2) for k, v in report["speedup"].items()}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

"""Decode benchmark (GPU): batch-1 tokens/s against the memory-bandwidth bound, engine throughput at
several concurrency levels, and Hugging Face transformers `generate` on the same weights as a peer.

    PYTHONPATH=. python benchmarks/decode.py [--presets 125m,1b] [--json out.json]

* bandwidth: a measured device copy (bytes read + written over time) of a 1 GiB bf16 array.
* batch-1: `smedjan.infer.runner.decode_loop` (the on-device loop `generate` runs) after a prefill,
  greedy, random-init bf16 params. Bound = bandwidth / (weight bytes + KV bytes read per token);
  weight bytes exclude the embedding table of untied models (one row is read), KV bytes use the
  average context of the timed tokens.
* engine: `Runner.step` (the jitted step the server's scheduler drives) with c of 64 slots
  occupied, tokens fetched to the host every step as the server does; tokens/s = c * steps / time.
* hf: transformers `generate(do_sample=False)`, bf16, cuda, default (dynamic) cache, the same
  weights; decode rate from (t(N tokens) - t(1 token)) / (N - 1).
No FastAPI/uvicorn needed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from smedjan.bench import timed_decode_loop
from smedjan.config import preset
from smedjan.infer import runner as gen
from smedjan.infer.sampling import SamplingParams
from smedjan.model.transformer import init_params, param_bytes


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(gib: float = 1.0, repeats: int = 10) -> float:
    """Bytes/s of a device elementwise copy (read + write counted)."""
    n = int(gib * (1 << 30)) // 2
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32).astype(jnp.bfloat16)
    f = jax.jit(lambda a: a + jnp.bfloat16(1))
    jax.block_until_ready(f(x))
    t = _median_time(lambda: f(x), repeats)
    return 2 * x.nbytes / t


def kv_bytes_per_token(cfg, context: float, itemsize: int = 2) -> float:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize * context


def weight_bytes(cfg, w) -> int:
    """Weight bytes one decode step reads: every matrix, the head, and one row of the embedding table
    (param_bytes counts a tied embed/head array twice, an untied one's table once: both minus the table)."""
    e = w["embed"]
    return param_bytes(w) - e.nbytes + e.shape[1] * e.dtype.itemsize


def bench_batch1(cfg, params, *, prompt_len, new_tokens, attn, repeats):
    total = prompt_len + new_tokens + 1
    max_len = gen.next_bucket(total, minimum=64)
    runner = gen.Runner(params, cfg, 1, max_len, attn_impl=attn)
    row = SamplingParams(max_new_tokens=new_tokens).row(0)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, prompt_len).tolist()
    kv_len = gen.next_bucket(total, max_len)

    def once():
        t, toks = timed_decode_loop(runner, cfg, prompt, row, new_tokens, kv_len)
        return t, np.asarray(toks)

    t_compile = time.perf_counter()
    _, toks = once()
    t_compile = time.perf_counter() - t_compile
    times = [once()[0] for _ in range(repeats)]
    t = statistics.median(times)
    wbytes = weight_bytes(cfg, runner.w)
    return {
        "tokens_per_s": new_tokens / t,
        "ms_per_token": 1e3 * t / new_tokens,
        "weight_bytes": wbytes,
        "first_call_s": t_compile,
        "times_s": times,
        "tokens": toks[0, :32].tolist(),
    }, runner.w


def bench_engine(cfg, w, *, concurrencies, max_batch, prompt_len, steps, repeats, chunk=8):
    steps -= steps % chunk
    max_len = gen.next_bucket(prompt_len + steps + 2, minimum=64)
    runner = gen.Runner(w, cfg, max_batch, max_len, min_kv_bucket=gen.next_bucket(prompt_len + steps + 1))
    row = SamplingParams().row(0)
    rng = np.random.default_rng(1)
    results = {}
    for c in concurrencies:

        def once(c=c):
            runner.pos[:] = 0
            for s in range(c):  # prefill c requests into slots (not timed)
                runner.prefill([s], [rng.integers(0, cfg.vocab_size, prompt_len).tolist()], [row])
            jax.block_until_ready(runner.state)
            active = np.zeros(max_batch, bool)
            active[:c] = True
            t0 = time.perf_counter()
            for _ in range(steps // chunk):  # the server's dispatch: `chunk` steps, then fetch the tokens
                jax.device_get(runner.step(active, n_steps=chunk))
            return time.perf_counter() - t0

        once()  # compile / warm
        times = [once() for _ in range(repeats)]
        t = statistics.median(times)
        results[c] = {"tokens_per_s": c * steps / t, "ms_per_step": 1e3 * t / steps, "times_s": times}
        print(
            f"  engine c={c}: {results[c]['tokens_per_s']:.0f} tok/s ({results[c]['ms_per_step']:.2f} ms/step)",
            flush=True,
        )
    return results


def bench_hf(cfg, params, *, prompt_len, new_tokens, repeats):
    import torch
    import transformers

    from smedjan.checkpoint import hf_tensors

    d = cfg.to_hf_dict()
    model_type = d.pop("model_type")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **d)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    model.eval()
    sd = {}
    for name, arr in hf_tensors(params, jnp.bfloat16):
        sd[name] = torch.from_numpy(np.ascontiguousarray(arr).view(np.uint16)).view(torch.bfloat16)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights did not load: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    prompt = torch.tensor([np.random.default_rng(0).integers(0, cfg.vocab_size, prompt_len).tolist()], device=dev)

    def run(n):
        with torch.no_grad():
            out = model.generate(
                prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None
            )
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    run(4)

    def timed(n):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = run(n)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts), out

    t1, _ = timed(1)
    tn, out = timed(new_tokens)
    model = None  # frees the GPU memory before the next benchmark (run() holds only this name)
    if dev == "cuda":
        torch.cuda.empty_cache()
    return {
        "tokens_per_s": (new_tokens - 1) / (tn - t1),
        "ms_per_token": 1e3 * (tn - t1) / (new_tokens - 1),
        "attn_implementation": getattr(hf_cfg, "_attn_implementation", None),
        "tokens": out[0, prompt_len : prompt_len + 32].tolist(),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="125m,1b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--engine-presets", default="1b", help="presets to run the engine sweep on")
    ap.add_argument("--engine-steps", type=int, default=120)
    ap.add_argument(
        "--engine-chunk", type=int, default=8, help="decode steps per engine dispatch (the server's --decode-chunk)"
    )
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", default="xla", help="decode attention impl(s) for batch-1, comma separated")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args(argv)

    report = {
        "device": str(jax.devices()[0]),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "args": vars(args),
        "presets": {},
    }

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)

    bw = copy_bandwidth()
    report["copy_bandwidth_GBps"] = bw / 1e9
    print(f"device copy bandwidth: {bw / 1e9:.0f} GB/s ({report['device']})", flush=True)
    dump()
    for name in args.presets.split(","):
        cfg = preset(name)
        params = init_params(cfg, jax.random.key(0), jnp.bfloat16)
        r = {"num_params": cfg.num_params()}
        report["presets"][name] = r
        ctx = args.prompt_len + args.new_tokens / 2
        w = None
        for attn in args.attn.split(","):
            try:
                res, w = bench_batch1(
                    cfg, params, prompt_len=args.prompt_len, new_tokens=args.new_tokens, attn=attn, repeats=args.repeats
                )
            except Exception as e:  # keep going: other rows still count
                r[f"batch1_{attn}"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{name} batch-1 [{attn}] failed: {e}", flush=True)
                continue
            per_tok = res["weight_bytes"] + kv_bytes_per_token(cfg, ctx)
            res["bytes_per_token"] = per_tok
            res["bound_tokens_per_s"] = bw / per_tok
            res["fraction_of_bound"] = res["tokens_per_s"] / res["bound_tokens_per_s"]
            r[f"batch1_{attn}"] = res
            print(
                f"{name} batch-1 [{attn}]: {res['tokens_per_s']:.0f} tok/s, bound {res['bound_tokens_per_s']:.0f} "
                f"({100 * res['fraction_of_bound']:.0f}%), first call {res['first_call_s']:.1f}s",
                flush=True,
            )
            dump()
        if not args.no_hf:
            try:
                r["hf"] = bench_hf(
                    cfg, params, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats
                )
                print(f"{name} HF generate: {r['hf']['tokens_per_s']:.0f} tok/s", flush=True)
            except Exception as e:
                r["hf"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{name} HF failed: {e}", flush=True)
            dump()
        del params
        if name in args.engine_presets.split(",") and w is not None:
            try:
                r["engine"] = bench_engine(
                    cfg,
                    w,
                    concurrencies=[int(c) for c in args.concurrency.split(",")],
                    max_batch=args.max_batch,
                    prompt_len=args.prompt_len,
                    steps=args.engine_steps,
                    repeats=args.repeats,
                    chunk=args.engine_chunk,
                )
            except Exception as e:
                r["engine"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{name} engine failed: {e}", flush=True)
            dump()
        del w

    # ---- table ----
    print(
        f"\ncopy bandwidth {report['copy_bandwidth_GBps']:.0f} GB/s; prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, bf16, greedy"
    )
    print(f"{'preset':<7} {'path':<22} {'tok/s':>9} {'ms/tok':>7} {'% bound':>8} {'vs HF':>6}")
    for name, r in report["presets"].items():
        hf = r.get("hf", {}).get("tokens_per_s")
        for key, v in r.items():
            if key.startswith("batch1_") and "tokens_per_s" in v:
                ratio = f"{v['tokens_per_s'] / hf:.1f}x" if hf else "-"
                print(
                    f"{name:<7} {'batch-1 ' + key[7:]:<22} {v['tokens_per_s']:>9.0f} {v['ms_per_token']:>7.2f} "
                    f"{100 * v['fraction_of_bound']:>7.0f}% {ratio:>6}"
                )
        if hf:
            print(f"{name:<7} {'HF generate':<22} {hf:>9.0f} {r['hf']['ms_per_token']:>7.2f} {'':>8} {'1.0x':>6}")
        eng = r.get("engine", {})
        base = eng.get(1, {}).get("tokens_per_s") if isinstance(eng, dict) else None
        b1 = r.get("batch1_xla", {}).get("tokens_per_s")
        for c, v in eng.items() if isinstance(eng, dict) else []:
            if isinstance(v, dict) and "tokens_per_s" in v:
                scale = f"{v['tokens_per_s'] / base:.1f}x c1" if base else ""
                scale += f", {v['tokens_per_s'] / b1:.1f}x batch-1 loop" if b1 else ""
                print(
                    f"{name:<7} {f'engine c={c}':<22} {v['tokens_per_s']:>9.0f} {v['ms_per_step']:>7.2f} "
                    f"{'':>8} {scale}"
                )
    dump()
    return report


if __name__ == "__main__":
    main()

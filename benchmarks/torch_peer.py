"""PyTorch + transformers peer for `smedjan bench --peer torch`.

Builds `transformers.LlamaForCausalLM` from smedjan's `cfg.to_hf_dict()` and times the
same three columns as the JAX bench, at the same shapes:

* forward: logits for [B, S] fresh random tokens, bf16 weights on CUDA (fp32 on CPU).
* decode:  batch 1, greedy `generate` with a KV cache; per-token time is
  (t(prompt + n new) - t(prompt + 1 new)) / (n - 1), so the prefill is excluded.
  "eager" uses the default dynamic cache; "compile" uses `cache_implementation="static"`,
  which makes transformers torch.compile the decoding forward (CUDA only).
* train: fp32 master weights, bf16 autocast, cross-entropy from `labels=`, AdamW
  (fused on CUDA), zero_grad(set_to_none). "compile" wraps the model in torch.compile.
  A batch that runs out of memory is retried with HF gradient checkpointing (reported as
  "grad_checkpointing" in the result; `--grad-checkpointing on|off` forces it either way).

Each mode runs eager and, unless disabled, torch.compile. Timing: warm-up excluded,
`torch.cuda.synchronize()` around a chunk of iterations, median over repeats.

Run standalone (prints JSON on the last line) so that the JAX process never shares a
GPU allocator with torch:
    python benchmarks/torch_peer.py --config-json '{...hf dict...}' --batch 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time


def _sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(torch, device, run_chunk, iters, repeats, warmup):
    if warmup:
        run_chunk(warmup)
        _sync(torch, device)
    times = []
    for _ in range(repeats):
        _sync(torch, device)
        t0 = time.perf_counter()
        run_chunk(iters)
        _sync(torch, device)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times), times


def build_model(hf_dict: dict, device, dtype):
    import torch
    import transformers

    d = dict(hf_dict)
    d.pop("architectures", None)
    d.pop("model_type", None)
    d["dtype"] = str(dtype).replace("torch.", "")
    config = transformers.LlamaConfig(**d)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype)


def _train(torch, device, hf_dict, mode, batch, seq_len, iters, repeats, warmup, rand_tokens, checkpointing):
    """fp32 master weights, bf16 autocast, loss from `labels=`, AdamW; optionally HF gradient checkpointing."""
    model = build_model(hf_dict, device, torch.float32).train()
    if checkpointing:  # newer transformers renamed gradient_checkpointing_enable (deprecated); older have only it
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    step_model = torch.compile(model) if mode == "compile" else model
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=1e-4,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        **({"fused": True} if device.type == "cuda" else {}),
    )
    train_pool = [rand_tokens(batch, seq_len) for _ in range(4)]

    def train_chunk(n):
        for i in range(n):
            toks = train_pool[i % len(train_pool)]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = step_model(input_ids=toks, labels=toks, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t, times = _timed(torch, device, train_chunk, iters, repeats, warmup)
    return {
        "tokens_per_s": batch * seq_len / t,
        "step_ms": t * 1e3,
        "times_s": times,
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "grad_checkpointing": checkpointing,
    }


def run_peer(
    hf_dict: dict,
    batch: int,
    seq_len: int,
    *,
    iters: int = 10,
    repeats: int = 3,
    warmup: int = 2,
    modes=("eager", "compile"),
    columns=("forward", "decode", "train"),
    decode_tokens: int | None = None,
    grad_checkpointing: str = "auto",
    log=lambda *a: None,
) -> dict:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = hf_dict["vocab_size"]
    gen = torch.Generator(device=device).manual_seed(1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def rand_tokens(b, s):
        return torch.randint(0, vocab, (b, s), device=device, generator=gen)

    pool = [rand_tokens(batch, seq_len) for _ in range(4)]
    out = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(low),
        "results": {},
    }
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass

    for mode in modes:
        if mode == "compile" and device.type != "cuda" and "force_cpu_compile" not in modes:
            pass  # allowed, just slow; callers on CPU usually pass modes=("eager",)
        res = {}
        if "forward" in columns or "decode" in columns:
            model = build_model(hf_dict, device, low).eval()
            fwd_model = torch.compile(model) if mode == "compile" else model
            if "forward" in columns:
                log(f"[peer {mode}] forward")

                @torch.no_grad()
                def fwd_chunk(n, fwd_model=fwd_model):
                    for i in range(n):
                        fwd_model(input_ids=pool[i % len(pool)], use_cache=False)

                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t, times = _timed(torch, device, fwd_chunk, iters, repeats, warmup)
                res["forward"] = {
                    "tokens_per_s": batch * seq_len / t,
                    "step_ms": t * 1e3,
                    "times_s": times,
                    "peak_mem_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
                }
            if "decode" in columns and not (mode == "compile" and device.type != "cuda"):
                log(f"[peer {mode}] decode")
                n_new = decode_tokens or max(2, seq_len // 2)
                prompt_len = max(1, seq_len - n_new)
                prompt = rand_tokens(1, prompt_len)
                extra = {"cache_implementation": "static"} if mode == "compile" else {}

                @torch.no_grad()
                def gen_time(n, model=model, prompt=prompt, extra=extra):
                    _sync(torch, device)
                    t0 = time.perf_counter()
                    model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **extra)
                    _sync(torch, device)
                    return time.perf_counter() - t0

                gen_time(n_new)  # warm-up (and compile, for the static cache)
                gen_time(1)
                per_tok = []
                for _ in range(repeats):
                    per_tok.append((gen_time(n_new) - gen_time(1)) / (n_new - 1))
                t = statistics.median(per_tok)
                res["decode"] = {
                    "tokens_per_s": 1.0 / t,
                    "step_ms": t * 1e3,
                    "times_s": per_tok,
                    "decode_tokens": n_new,
                    "prompt_len": prompt_len,
                }
            del model, fwd_model
        if "train" in columns:
            log(f"[peer {mode}] train")
            out_of_memory = False
            try:
                res["train"] = _train(
                    torch,
                    device,
                    hf_dict,
                    mode,
                    batch,
                    seq_len,
                    iters,
                    repeats,
                    warmup,
                    rand_tokens,
                    grad_checkpointing == "on",
                )
            except torch.cuda.OutOfMemoryError:
                if grad_checkpointing != "auto":
                    raise
                out_of_memory = True
            if out_of_memory:  # retried outside the handler: its traceback would keep the first try's tensors
                # What a torch user does when the batch does not fit: recompute each layer in the
                # backward (HF's gradient checkpointing); reported with the result.
                log(f"[peer {mode}] train: out of memory, retrying with gradient checkpointing")
                gc.collect()
                torch.cuda.empty_cache()
                res["train"] = _train(
                    torch, device, hf_dict, mode, batch, seq_len, iters, repeats, warmup, rand_tokens, True
                )
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out["results"][mode] = res
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-json", required=True, help="HF config dict as JSON (cfg.to_hf_dict())")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=None)
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--columns", default="forward,decode,train")
    p.add_argument(
        "--grad-checkpointing",
        choices=["auto", "on", "off"],
        default="auto",
        help="train with HF gradient checkpointing: auto = only if the batch runs out of memory",
    )
    args = p.parse_args(argv)
    res = run_peer(
        json.loads(args.config_json),
        args.batch,
        args.seq_len,
        iters=args.iters,
        repeats=args.repeats,
        warmup=args.warmup,
        modes=tuple(args.modes.split(",")),
        columns=tuple(args.columns.split(",")),
        decode_tokens=args.decode_tokens,
        grad_checkpointing=args.grad_checkpointing,
        log=lambda *a: print(*a, file=sys.stderr, flush=True),
    )
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LoRA / full SFT speed and memory at the `1b` shape, smedjan vs transformers + PEFT, in one run.

    python benchmarks/lora_speed.py                       # every row, each in its own process
    python benchmarks/lora_speed.py --only smedjan-lora   # one row (what each subprocess runs)

Rows (batch 8 x 2048 unless said; LoRA r=16 alpha 32 on all seven projections, bf16 frozen base,
AdamW on the adapters only; tokens/s over timed steps after warm-up; peak = the device allocator's peak):

* smedjan-lora            smedjan.train.step with the SFT objective and LoRA (`smedjan sft --lora`'s step)
* torch-eager / -gc / -compile   transformers LlamaForCausalLM (sdpa) + peft.get_peft_model, bf16 weights,
                          labels= loss; -gc: HF gradient checkpointing; -compile: torch.compile(model)
* smedjan-full-packed / -plain   full fine-tuning (fp32 master, bf16 compute): packed rows with segment
                          ids and per-example positions (`smedjan sft`) vs plain windows (`smedjan train`)
* longest-lora            the longest batch-1 sequence LoRA fits, doubling from 16k (remat full)

Each row runs in a fresh process (JAX and torch never share the GPU allocator); the script stops
starting new rows after --budget-s seconds and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# LORA_BENCH_SIZE/SEQ/BATCH shrink the shape for a smoke test off the GPU
SIZE = os.environ.get("LORA_BENCH_SIZE", "1b")
SEQ = int(os.environ.get("LORA_BENCH_SEQ", 2048))
BATCH = int(os.environ.get("LORA_BENCH_BATCH", 8))
RANK = 16
ROWS = ["smedjan-lora", "torch-eager", "smedjan-full-packed", "smedjan-full-plain", "torch-compile", "torch-gc"]


def _cfg(seq):
    from smedjan.config import resolve_config

    return resolve_config(SIZE, max_position_embeddings=max(seq, 2048))


def _batch(seq, batch, packed, vocab):
    import numpy as np

    rng = np.random.default_rng(0)
    toks = rng.integers(3, vocab, (batch, seq + 1)).astype(np.int32)
    b = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    if packed:  # SFT-like rows: examples of 200-900 tokens packed back to back
        seg = np.zeros((batch, seq), np.int32)
        pos = np.zeros((batch, seq), np.int32)
        for r in range(batch):
            at, s = 0, 1
            while at < seq:
                n = min(int(rng.integers(200, 900)), seq - at)
                seg[r, at : at + n], pos[r, at : at + n] = s, np.arange(n)
                at, s = at + n, s + 1
        b.update(segment_ids=seg, positions=pos)
    return b


def run_smedjan(kind, seq, batch, steps, remat):
    import jax
    import jax.numpy as jnp

    from smedjan.model.lora import LoraConfig
    from smedjan.model.transformer import init_params
    from smedjan.runconfig import OptimConfig, ScheduleConfig
    from smedjan.train.objectives.sft import SFT
    from smedjan.train.step import TrainState, init_train_state, make_optimizer, make_train_step

    cfg = _cfg(seq)
    opt = make_optimizer(OptimConfig(lr=1e-4, weight_decay=0.0), ScheduleConfig(warmup_steps=0), 1000)
    lora = LoraConfig(rank=RANK, alpha=2 * RANK) if kind == "lora" else None
    step = make_train_step(cfg, opt, objective=SFT(), lora=lora, remat=remat)
    frozen = None
    if lora is not None:
        frozen = {"base": jax.jit(lambda k: init_params(cfg, k, jnp.bfloat16))(jax.random.key(0))}
        state = init_train_state(cfg, jax.random.key(1), opt, lora=lora)
    else:
        state = init_train_state(cfg, jax.random.key(1), opt)
    batch_np = _batch(seq, batch, packed=kind != "full-plain", vocab=cfg.vocab_size)
    data = jax.device_put(batch_np)
    for _ in range(2):
        state, m = step(state, data, frozen)
    float(m["loss"])
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, data, frozen)
    float(m["loss"])
    dt = (time.perf_counter() - t) / steps
    assert isinstance(state, TrainState)
    stats = jax.devices()[0].memory_stats() or {}
    tokens = batch * seq
    flops = cfg.flops_per_token(seq) * tokens
    if lora is not None:  # no weight gradients for the base: 2/3 of the dense training FLOPs
        flops = flops * 2 / 3
    return {
        "tok_s": tokens / dt,
        "step_ms": dt * 1e3,
        "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
        "mfu": flops / dt / 989e12,
        "loss": float(m["loss"]),
    }


def run_torch(variant, seq, batch, steps):
    import peft
    import torch
    import transformers

    cfg = _cfg(seq)
    d = cfg.to_hf_dict()
    d.pop("architectures", None)
    d.pop("model_type", None)
    hf = transformers.LlamaConfig(**d)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM._from_config(hf, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    if variant == "gc":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets))
    model.train()
    fwd = torch.compile(model) if variant == "compile" else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    x = torch.randint(3, cfg.vocab_size, (batch, seq), device="cuda")

    def one():
        loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(2):
        one()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        loss = one()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    return {
        "tok_s": batch * seq / dt,
        "step_ms": dt * 1e3,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": float(loss),
    }


def longest(budget_s):
    """Largest batch-1 LoRA sequence (doubling from 16k) that trains, each try in its own process."""
    best, seq, t0 = None, int(os.environ.get("LORA_BENCH_LONG_FROM", 16384)), time.time()
    while time.time() - t0 < budget_s:
        r = _child(f"smedjan-lora-seq{seq}", timeout=max(30, budget_s - (time.time() - t0)))
        if "error" in r:
            break
        best, seq = {"seq": seq, **r}, seq * 2
    return best or {"error": "16k did not fit or ran out of time"}


def _child(row, timeout):
    cmd = [sys.executable, __file__, "--only", row]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    last = (p.stdout.strip().splitlines() or [""])[-1]
    try:
        return json.loads(last)
    except json.JSONDecodeError:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:160]}


def one_row(row):
    if row.startswith("smedjan-lora-seq"):
        return run_smedjan("lora", int(row.rsplit("seq", 1)[1]), 1, 3, "full")
    if row == "smedjan-lora":
        return run_smedjan("lora", SEQ, BATCH, 10, "auto")
    if row.startswith("smedjan-full-"):
        return run_smedjan(row[len("smedjan-") :], SEQ, BATCH, 8, "auto")
    if row.startswith("torch-"):
        return run_torch(row[len("torch-") :], SEQ, BATCH, 8)
    raise SystemExit(f"unknown row {row}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="run one row in this process and print its JSON")
    ap.add_argument("--budget-s", type=float, default=270)
    ap.add_argument("--rows", default=",".join(ROWS + ["longest-lora"]))
    args = ap.parse_args()
    if args.only:
        print(json.dumps(one_row(args.only)))
        return
    t0, results = time.time(), {}
    for row in args.rows.split(","):
        left = args.budget_s - (time.time() - t0)
        if left < 20:
            results[row] = {"error": "skipped: out of time budget"}
            continue
        results[row] = longest(left) if row == "longest-lora" else _child(row, timeout=left)
        print(row, json.dumps(results[row]), flush=True)
    print(f"\n{SIZE} preset, batch {BATCH} x {SEQ} (longest-lora: batch 1), LoRA r={RANK} all linear, bf16 base")
    print(f"{'row':22s} {'tok/s':>10s} {'peak GiB':>9s} {'MFU':>6s}  note")
    for row, r in results.items():
        if "error" in r:
            print(f"{row:22s} {'-':>10s} {'-':>9s} {'-':>6s}  {r['error']}")
        else:
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
            note = f"seq {r['seq']}" if "seq" in r else f"{r['step_ms']:.0f} ms/step"
            print(f"{row:22s} {r['tok_s']:>10,.0f} {r['peak_gib']:>9.1f} {mfu:>6s}  {note}")
    print("JSON " + json.dumps(results))


if __name__ == "__main__":
    main()

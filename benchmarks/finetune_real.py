"""Fine-tuning on real data, CPU-sized (minutes): the numbers in benchmarks/RESULTS.md ("Fine-tuning").

    python convert/llama2c.py --checkpoint ../shared/data/models/stories260K/stories260K.bin \\
        --tokenizer ../shared/data/models/stories260K/tok512.bin --output runs/stories260K
    python benchmarks/finetune_real.py --model runs/stories260K --out runs/ft_real

1. SFT of the real stories260K (llama2.c) model on instruction data (Stanford Alpaca seed tasks +
   self-instruct user tasks, one example per instance), full and LoRA: held-out loss before/after and
   greedy answers before/after. The converted folder has no chat template; this script gives it a
   small Q/A one (written into the folder, so it is the checkpoint's own template from then on).
2. SFT (on the HH-RLHF chosen dialogues) then DPO on HH-RLHF helpful pairs: held-out reward accuracy
   and margin of the DPO model against the SFT model it started from (the reference).
3. Distillation: stories260K as teacher, a 4x smaller student trained on stories the teacher wrote,
   distilled (alpha 0.5, T 2) vs the same student from scratch (alpha 0: hard labels only), equal steps:
   held-out cross-entropy of both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import jax

from smedjan.finetune import FinetuneConfig, finetune, load_model
from smedjan.runconfig import from_dict
from smedjan.train.objectives.distill import Distill
from smedjan.train.objectives.dpo import DPO
from smedjan.train.objectives.sft import SFT

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
QA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}Q: {{ m['content'] }}\nA:"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
)
PROMPTS = ["Give me three colors.", "What is a good name for a dog?", "Write a short greeting."]


def before(out, ft, objective):
    """Validation of the starting model: one step at a learning rate of 1e-12 (Adam moves each weight by
    about that much; a run has at least one step, and a 1-step schedule has no warm-up)."""
    return finetune(rc_for(out, 1, lr=1e-12), ft, objective)


SEQ = 256
STEPS = {"sft": 150, "hh_sft": 100, "dpo": 150, "kd": 300}


def rc_for(out, steps, **kw):
    base = dict(out=str(out), steps=steps, batch_size=8, seq_len=SEQ, lr=1e-3, warmup_steps=5, weight_decay=0.0)
    base.update(eval_every=max(steps, 1), eval_batches=8, save_every=10_000, log_every=10, progress=False)
    base.update(kw)
    return from_dict(base)


def answers(folder, adapter=None):
    """Greedy answers (smedjan's own decoder) to PROMPTS in the folder's chat template."""
    from smedjan.infer.runner import generate
    from smedjan.model.lora import merge
    from smedjan.peft import load_adapter

    cfg, params, tok, _ = load_model(str(folder))
    if adapter:
        ad, lcfg = load_adapter(adapter, cfg)
        params = merge(params, ad, lcfg)
    ids = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
        for p in PROMPTS
    ]
    outs = generate(params, cfg, ids, max_new_tokens=40, temperature=0.0, eos_id=tok.stop_ids)
    return [tok.decode(o, skip_special_tokens=True).strip() for o in outs]


def sft_stage(model, out, rows):
    sft_data = [
        str(DATA / "sft/stanford_alpaca_seed_tasks.jsonl"),
        str(DATA / "sft/self_instruct_user_oriented_instructions.jsonl"),
    ]
    res = {}
    for name, lora in (("full", False), ("lora", True)):
        ft = FinetuneConfig(
            model=str(model), data=tuple(sft_data), val_fraction=0.1, lora=lora, lora_rank=8, lora_alpha=16
        )
        start = before(out / f"sft_{name}_0", ft, SFT())["val_loss"]
        t = time.time()
        s = finetune(rc_for(out / f"sft_{name}", STEPS["sft"], lr=3e-3 if lora else 1e-3), ft, SFT())
        res[name] = dict(before=start, after=s["val_loss"], wall_s=time.time() - t)
        rows.append(
            f"| SFT {name} ({STEPS['sft']} steps, 8x{SEQ}) | held-out loss {start:.3f} -> {s['val_loss']:.3f} | {time.time() - t:.0f} s |"
        )
    res["answers_before"] = answers(model)
    res["answers_lora"] = answers(model, out / "sft_lora/adapter")
    res["answers_full"] = answers(out / "sft_full/hf")
    return res


def dpo_stage(model, out, rows):
    # SFT on the chosen HH dialogues first (the DPO paper's recipe: the reference is an SFT model)
    pairs = DATA / "dpo/hh-rlhf-helpful-base-test.prompt_chosen_rejected.jsonl"
    chosen = out / "hh_chosen.jsonl"
    with open(pairs) as f, open(chosen, "w") as g:
        for line in f:
            r = json.loads(line)
            g.write(json.dumps({"text": r["prompt"] + r["chosen"]}) + "\n")
    ft = FinetuneConfig(model=str(model), data=(str(chosen),), val_fraction=0.05)
    s = finetune(rc_for(out / "hh_sft", STEPS["hh_sft"]), ft, SFT())
    sft_model = s["hf_dir"]
    ft = FinetuneConfig(model=sft_model, data=(str(pairs),), val_fraction=0.1)
    at0 = before(out / "dpo_0", ft, DPO(beta=0.1))
    d = finetune(rc_for(out / "dpo", STEPS["dpo"], lr=5e-4), ft, DPO(beta=0.1))
    keys = ("val_rewards/accuracies", "val_rewards/margins", "val_loss")
    res = {"sft": {k: at0[k] for k in keys}, "dpo": {k: d[k] for k in keys}}
    rows.append(
        f"| DPO (beta 0.1, {STEPS['dpo']} steps) vs its SFT start | held-out reward accuracy {at0[keys[0]]:.3f} -> {d[keys[0]]:.3f}, "
        f"margin {at0[keys[1]]:.3f} -> {d[keys[1]]:.3f}, loss {at0[keys[2]]:.3f} -> {d[keys[2]]:.3f} | |"
    )
    return res


def distill_stage(model, out, rows, n_stories=1200):
    from smedjan.infer.runner import generate

    cfg, params, tok, _ = load_model(str(model))
    ids = [[tok.bos_id] for _ in range(n_stories)]
    texts = []
    for i in range(0, n_stories, 200):
        outs = generate(params, cfg, ids[i : i + 200], max_new_tokens=200, temperature=1.0, seed=i, eos_id=tok.stop_ids)
        texts += [tok.decode(o, skip_special_tokens=True) for o in outs]
    data = out / "stories.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    student = dict(
        hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    res = {}
    for name, alpha in (("distilled", 0.5), ("scratch", 0.0)):
        ft = FinetuneConfig(teacher=str(model), student_size="tiny", data=(str(data),), val_fraction=0.1)
        s = finetune(
            rc_for(out / f"kd_{name}", STEPS["kd"], model_overrides=student, lr=3e-3),
            ft,
            Distill(alpha=alpha, temperature=2.0),
        )
        res[name] = s["val_ce"]
    rows.append(
        f"| distillation, student 4x smaller, {STEPS['kd']} steps | held-out CE distilled {res['distilled']:.3f} vs from scratch "
        f"{res['scratch']:.3f} | |"
    )
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the converted stories260K HF folder")
    ap.add_argument("--out", default="runs/ft_real")
    ap.add_argument("--stages", default="sft,dpo,distill")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count")
    args = ap.parse_args()
    global SEQ
    SEQ = args.seq_len
    STEPS.update({k: max(1, int(v * args.scale)) for k, v in STEPS.items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "stories260K"
    if not model.is_dir():
        shutil.copytree(args.model, model)
    (model / "chat_template.jinja").write_text(QA_TEMPLATE)
    rows, results = [], {"jax": jax.__version__, "backend": jax.default_backend()}
    stages = args.stages.split(",")
    if "sft" in stages:
        results["sft"] = sft_stage(model, out, rows)
    if "dpo" in stages:
        results["dpo"] = dpo_stage(model, out, rows)
    if "distill" in stages:
        results["distill"] = distill_stage(model, out, rows)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(["| run | result | wall |", "|---|---|---|", *rows]))
    for k in ("answers_before", "answers_lora", "answers_full"):
        if "sft" in results:
            print(k, json.dumps(results["sft"][k], indent=1))


if __name__ == "__main__":
    main()

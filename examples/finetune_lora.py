"""LoRA fine-tuning of any Llama/Mistral/Qwen Hugging Face checkpoint, from Python, in JAX.

    python examples/finetune_lora.py MODEL_FOLDER_OR_HUB_ID chat.jsonl runs/my-lora

chat.jsonl holds {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]} rows (Alpaca
{"instruction", "input", "output"} rows work too). The result is a PEFT adapter folder:
    peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL), "runs/my-lora/adapter")
The second half shows the pieces underneath, for a custom loop: the model is a pure function of a
params dict, the adapters are a dict of their own, and the objective is a small frozen dataclass.
"""

import sys

import jax
import jax.numpy as jnp
import optax

from smedjan.data.chat import pack, sft_examples
from smedjan.finetune import FinetuneConfig, finetune, load_model
from smedjan.model.lora import LoraConfig, attach, init_adapters
from smedjan.model.transformer import param_shapes
from smedjan.peft import save_adapter
from smedjan.runconfig import from_dict
from smedjan.train.objectives import Forward
from smedjan.train.objectives.sft import SFT

model, data, out = sys.argv[1:4]

# 1. The whole run in one call: packing, progress bar, validation, checkpoints, resume, PEFT export.
rc = from_dict(dict(out=out, steps=100, batch_size=8, seq_len=512, lr=2e-4, warmup_steps=10, weight_decay=0.0))
ft = FinetuneConfig(model=model, data=(data,), lora=True, lora_rank=16, lora_alpha=32)
print(finetune(rc, ft, SFT()))

# 2. The same pieces by hand: a few steps of your own loop.
cfg, base, tok, folder = load_model(model)
lcfg = LoraConfig(rank=8, alpha=16)
adapters = init_adapters(param_shapes(cfg), lcfg, jax.random.key(0))
examples, _ = sft_examples(data, tok, max_len=257)
rows = pack(examples, 256)  # {"inputs", "targets", "segment_ids", "positions"} [N, 256]
fw = Forward(cfg, compute_dtype=jnp.bfloat16)
opt = optax.adamw(1e-4)
opt_state = opt.init(adapters)


@jax.jit
def step(adapters, opt_state, batch):
    def loss(a):
        total, _ = SFT().loss(fw, attach(base, a, lcfg), batch)
        return total / jnp.maximum(SFT().count(batch), 1)

    value, grads = jax.value_and_grad(loss)(adapters)
    updates, opt_state = opt.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, value


for i in range(10):
    batch = {k: v[(i * 4) % len(v) :][:4] for k, v in rows.items()}
    adapters, opt_state, value = step(adapters, opt_state, batch)
    print(f"step {i}: loss {float(value):.4f}")
save_adapter(f"{out}/adapter-by-hand", adapters, lcfg, base_model_name_or_path=model)

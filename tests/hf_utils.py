"""Builders for tiny random transformers models used by the parity tests (no downloads)."""

from __future__ import annotations

import numpy as np

TINY = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)

ARCHS = {
    "llama": dict(tie_word_embeddings=False),
    "llama_tied_bias": dict(model_type="llama", tie_word_embeddings=True, attention_bias=True, head_dim=24),
    "mistral": dict(sliding_window=5, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(tie_word_embeddings=True, head_dim=32),
}

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


def hf_config(arch: str, rope: str = "default", **overrides):
    import transformers

    kw = dict(TINY, **ARCHS[arch])
    model_type = kw.pop("model_type", arch)
    kw.update(overrides)
    cls = transformers.CONFIG_MAPPING[model_type]
    rope_params = {"rope_theta": 10000.0}
    if ROPES[rope] is not None:
        rope_params.update(ROPES[rope])
    else:
        rope_params["rope_type"] = "default"
    return cls(rope_parameters=rope_params, **kw)


def build_hf_model(arch: str, rope: str = "default", seed: int = 0, **overrides):
    """A randomly initialised fp32 transformers model; norms randomised too so they are tested."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(arch, rope, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()

"""The gated MLP (SwiGLU) part of a block."""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

from smedjan.config import ModelConfig
from smedjan.model.layers import linear, plus_lora, pre_norm, project


def mlp_block(x, p, cfg: ModelConfig):
    """The block's MLP branch, its pre-norm included: down(silu(gate(n(x))) * up(n(x)))."""
    xn, scale = pre_norm(x, p.get("post_attention_layernorm.weight"), cfg.rms_norm_eps)
    if "gate_up" in p:  # joined [2, F, D]: one GEMM
        gu = linear(xn, p["gate_up"], scale=scale)
        gate, up = plus_lora(gu[..., 0, :], xn, p, "mlp.gate_proj"), plus_lora(gu[..., 1, :], xn, p, "mlp.up_proj")
    else:
        gate, up = project(xn, p, "mlp.gate_proj", scale=scale), project(xn, p, "mlp.up_proj", scale=scale)
    # Named so a remat policy can keep the SwiGLU product (re-deriving it reads all of gate and up).
    act = checkpoint_name(jax.nn.silu(gate) * up, "mlp_act")
    return project(act, p, "mlp.down_proj")

"""Direct Preference Optimisation (Rafailov et al. 2023) and the IPO and conservative variants.

With Δ = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)) per pair (sums over completion tokens):

* sigmoid:  −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)   (ε = label_smoothing: conservative DPO; ε = 0 is DPO)
* ipo:      (Δ̄ − 1/(2β))², Δ̄ from log-probs averaged over completion tokens (as TRL does)

Rewards β·(log π − log π_ref) of chosen and rejected, their margin and the share of pairs whose chosen
reward is higher are reported like TRL's DPOTrainer. The reference log-probs are data: computed once
before training (`reference_logps`) and carried in the batch as ``ref_logps`` [B, 2], so no second
copy of the weights is needed (with LoRA the reference is the base: the adapters start at B = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from smedjan.runconfig import register_objective
from smedjan.train.loss import token_logprobs

LOSS_TYPES = ("sigmoid", "ipo")


@register_objective
@dataclass(frozen=True)
class DPO:
    name: ClassVar[str] = "dpo"
    metrics: ClassVar[tuple[str, ...]] = (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    )
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"DPO loss type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5:
            raise ValueError("DPO needs beta > 0 and 0 <= label_smoothing < 0.5")

    def count(self, batch):
        return jnp.sum(jnp.any(batch["targets"][:, 0] >= 0, axis=-1))

    def logps(self, fw, params, batch):
        """(summed log-probs [B, 2], completion tokens [B, 2]) of chosen ([:, 0]) and rejected ([:, 1])."""
        inputs, targets = batch["inputs"], batch["targets"]
        b, two, s = inputs.shape
        flat_t = targets.reshape(b * two, s).astype(jnp.int32)
        h = fw.hidden(params, inputs.reshape(b * two, s).astype(jnp.int32))
        lp = token_logprobs(h, fw.head(params), flat_t, chunk_size=fw.loss_chunk)
        return lp.sum(-1).reshape(b, two), (flat_t >= 0).sum(-1).reshape(b, two)

    def pair_losses(self, logps, ref_logps, n_tokens):
        """Per-pair loss [B] and the reward metrics (per pair) from sequence log-probs."""
        ratios = logps - ref_logps  # [B, 2]
        if self.loss_type == "ipo":
            avg = ratios / jnp.maximum(n_tokens, 1)
            losses = (avg[:, 0] - avg[:, 1] - 1 / (2 * self.beta)) ** 2
        else:
            z = self.beta * (ratios[:, 0] - ratios[:, 1])
            eps = self.label_smoothing
            losses = -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
        rewards = jax.lax.stop_gradient(self.beta * ratios)
        lp = jax.lax.stop_gradient(logps)
        metrics = {
            "rewards/chosen": rewards[:, 0],
            "rewards/rejected": rewards[:, 1],
            "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).astype(jnp.float32),
            "rewards/margins": rewards[:, 0] - rewards[:, 1],
            "logps/chosen": lp[:, 0],
            "logps/rejected": lp[:, 1],
        }
        return losses, metrics

    def loss(self, fw, params, batch, frozen=None):
        logps, n = self.logps(fw, params, batch)
        losses, metrics = self.pair_losses(logps, batch["ref_logps"], n)
        valid = jnp.any(batch["targets"][:, 0] >= 0, axis=-1)
        total = lambda x: jnp.sum(jnp.where(valid, x, 0.0))  # noqa: E731
        return total(losses), {k: total(v) for k, v in metrics.items()}

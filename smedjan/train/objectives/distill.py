"""Knowledge distillation: forward KL to a frozen teacher's temperature-softened distribution, mixed with
the hard-label loss, loss = α·T²·KL(p_teacher^T ‖ p_student^T) + (1−α)·CE (Hinton et al. 2015).

The teacher runs inside the step from `frozen["teacher"]` with its own config: any depth or width, one
vocabulary (the tokenizer must be the same; `smedjan.finetune` checks). Both heads' logits are formed
one token chunk at a time (`loss.distillation_loss`), so neither [B, S, V] block ever exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from smedjan.config import ModelConfig
from smedjan.runconfig import register_objective
from smedjan.train.loss import distillation_loss
from smedjan.train.objectives.lm import split_batch


@register_objective
@dataclass(frozen=True)
class Distill:
    name: ClassVar[str] = "distill"
    metrics: ClassVar[tuple[str, ...]] = ("kl", "ce")
    teacher_cfg: ModelConfig | None = None
    alpha: float = 0.5
    temperature: float = 2.0

    def __post_init__(self):
        if not 0 <= self.alpha <= 1 or self.temperature <= 0:
            raise ValueError("distillation needs 0 <= alpha <= 1 and temperature > 0")

    def count(self, batch):
        return jnp.sum(split_batch(batch)[1] >= 0)

    def loss(self, fw, params, batch, frozen):
        inputs, targets = split_batch(batch)
        inputs, targets = inputs.astype(jnp.int32), targets.astype(jnp.int32)
        seg, pos = batch.get("segment_ids"), batch.get("positions")
        teacher = jax.lax.stop_gradient(frozen["teacher"])
        h_t = fw.hidden(teacher, inputs, seg, pos, cfg=self.teacher_cfg)
        h = fw.hidden(params, inputs, seg, pos)
        s, kl, ce, _ = distillation_loss(
            h,
            fw.head(params),
            h_t,
            fw.head(teacher, self.teacher_cfg),
            targets,
            temperature=self.temperature,
            alpha=self.alpha,
            chunk_size=fw.loss_chunk,
        )
        return s, {"kl": kl, "ce": ce}

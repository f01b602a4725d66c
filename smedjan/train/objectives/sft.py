"""Supervised fine-tuning: the LM loss on assistant tokens only. Everything SFT-specific lives in the
data (smedjan.data.chat: chat-template masks, packing with segment ids), so the objective is LM's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from smedjan.runconfig import register_objective
from smedjan.train.objectives.lm import LM


@register_objective
@dataclass(frozen=True)
class SFT(LM):
    name: ClassVar[str] = "sft"

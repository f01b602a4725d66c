"""Training objectives: what a step minimises, behind one interface so one loop trains them all.

An objective is a frozen dataclass (hashable: it keys the compiled step) with

* ``name`` and ``metrics`` (names of extra per-count sums it reports, e.g. DPO's rewards);
* ``count(batch)``: the loss's denominator for the batch (target tokens, preference pairs), so
  accumulated micro-batches and data-parallel shards average exactly like one big batch;
* ``loss(fw, params, batch, frozen)``: (sum of per-count losses, {metric: sum}); `fw` runs the model
  (`Forward`), `params` are what the model runs with (LoRA adapters already attached), `frozen` is
  whatever else the objective reads and never trains (a teacher's weights).

lm (pre-training, and SFT: masked targets and packed segments come from the data), dpo and distill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smedjan.config import ModelConfig
from smedjan.model.transformer import forward, lm_head


@dataclass(frozen=True)
class Forward:
    """How the model runs inside a step (the knobs `train.step.speed_knobs` resolved)."""

    cfg: ModelConfig
    attn_impl: str = "auto"
    remat: str = "none"
    compute_dtype: Any = None
    loss_chunk: int = 1024
    scan_unroll: int | bool = 1

    def hidden(self, params, inputs, segment_ids=None, positions=None, cfg: ModelConfig | None = None):
        return forward(
            params,
            inputs,
            cfg or self.cfg,
            positions=positions,
            segment_ids=segment_ids,
            attn_impl=self.attn_impl,
            remat=self.remat,
            compute_dtype=self.compute_dtype,
            return_hidden=True,
            scan_unroll=self.scan_unroll,
        )

    def head(self, params, cfg: ModelConfig | None = None):
        return lm_head(params, cfg or self.cfg)

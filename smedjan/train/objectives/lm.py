"""Next-token cross-entropy over the counted targets: pre-training, and SFT (whose data masks the
prompt tokens and packs examples with segment ids and per-example positions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax.numpy as jnp

from smedjan.train.loss import chunked_cross_entropy


def split_batch(batch):
    """(inputs, targets): {"tokens" [B, S+1]} or {"inputs", "targets"} [B, S] (targets < 0 ignored)."""
    if "tokens" in batch:
        tokens = batch["tokens"]
        return tokens[:, :-1], tokens[:, 1:]
    return batch["inputs"], batch["targets"]


@dataclass(frozen=True)
class LM:
    name: ClassVar[str] = "lm"
    metrics: ClassVar[tuple[str, ...]] = ()

    def count(self, batch):
        return jnp.sum(split_batch(batch)[1] >= 0)

    def loss(self, fw, params, batch, frozen=None):
        inputs, targets = split_batch(batch)
        h = fw.hidden(params, inputs.astype(jnp.int32), batch.get("segment_ids"), batch.get("positions"))
        s, _ = chunked_cross_entropy(h, fw.head(params), targets.astype(jnp.int32), chunk_size=fw.loss_chunk)
        return s, {}

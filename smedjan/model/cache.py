"""What a layer keeps between forward passes, and how a pass reads and writes it.

A model's cache is a tuple with one entry per layer, so each layer's state is its own buffer
(updated in place when the caller donates it) and a layer of another kind (a recurrent mixer)
can hold another type of state beside the attention layers' `KVCache`.

`Pass` describes one forward pass over cached state: which cache rows the batch's rows are,
the absolute positions of its tokens, and whether attention reads the cache (decoding) or only
the block itself (a prefill from empty, or training without a cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from smedjan.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    """One attention layer's keys and values, [B, T, Hkv, D]: row b is one sequence, slot t its position t."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype) -> KVCache:
        shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def write(self, k, v, step: Pass) -> KVCache:
        """k/v [N, S, Hkv, D] at `step.positions` of cache rows `step.rows` (positions past the end dropped)."""
        if step.single_row:
            # One row writing one token: a plain dynamic-update-slice. XLA turns the general scatter into
            # read-old / select / write to keep out-of-bounds writes dropped (two more kernels per k and v
            # per layer on the latency-bound batch-1 path). An active row always writes inside the cache; a
            # finished row at the very end is clamped onto its own last slot, whose contents no longer matter.
            start = (0, step.positions[0, 0], 0, 0)
            return KVCache(
                jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), start),
                jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), start),
            )
        rows = step.rows[:, None]
        return KVCache(
            self.k.at[rows, step.positions].set(k.astype(self.k.dtype), mode="drop"),
            self.v.at[rows, step.positions].set(v.astype(self.v.dtype), mode="drop"),
        )

    def read(self, step: Pass, whole: bool = False):
        """(k, v) of the pass's rows: their first `step.kv_len` slots (every slot when `whole` or no kv_len)."""
        k, v = self.k, self.v
        if not step.own_rows:
            k, v = k[step.rows], v[step.rows]
        if whole or step.kv_len is None:
            return k, v
        return k[:, : step.kv_len], v[:, : step.kv_len]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> tuple:
    """Zero state for every layer of the model."""
    return tuple(KVCache.zeros(cfg, batch, max_len, dtype) for _ in range(cfg.num_hidden_layers))


@dataclass(frozen=True)
class Pass:
    """How one forward pass meets the cache (built inside the traced function; not a jit argument).

    positions: absolute positions [N, S] of the block's tokens.
    rows: cache row of each batch row [N] (the rows themselves when None is passed to `make`).
    attend_cache: attend over the cache (decoding, or a block continuing a cached sequence);
        False: over the block alone (a prefill into empty rows: the block is the whole sequence).
    kv_len: static cap on the cache slots a decode step reads (every position below it).
    single_row: one row, one token, rows == [0]: the cache write is a dynamic-update-slice.
    own_rows: batch row b is cache row b (no gather when reading).
    """

    positions: jax.Array
    rows: jax.Array
    attend_cache: bool = True
    kv_len: int | None = None
    single_row: bool = False
    own_rows: bool = True

    @classmethod
    def make(cls, positions, rows=None, attend_cache=True, kv_len=None) -> Pass:
        n, s = positions.shape
        own = rows is None
        if own:
            rows = jnp.arange(n, dtype=jnp.int32)
        return cls(positions, rows, attend_cache, kv_len, own and n == 1 and s == 1, own)

    @property
    def decoding(self) -> bool:
        """One new token per row, attending over the cache."""
        return self.attend_cache and self.positions.shape[1] == 1

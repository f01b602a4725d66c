"""Cross-entropy from final hidden states without materialising [B, S, V] logits.

The tokens are cut into chunks of `chunk_size`; a `lax.scan` computes each chunk's logits
[chunk, V] in float32, its log-sum-exp and target logit, and keeps only the two scalars.
The chunk body is wrapped in `jax.checkpoint`, so the backward pass recomputes the chunk's
logits instead of storing them: peak memory is one [chunk, V] block instead of [B·S, V].
The lm_head gradient accumulates in the weight's own (float32 master) dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -1  # targets below zero are not counted


def chunked_cross_entropy(hidden, weight, targets, *, chunk_size: int = 1024):
    """(sum of token losses, number of counted tokens), both float32/int32 scalars.

    hidden [B, S, D] (any float dtype, e.g. bf16 compute), weight [V, D] (the lm_head / tied
    embedding), targets [B, S] int (negative = ignore). Logits are hidden · weightᵀ, computed
    in hidden's dtype with float32 accumulation, softmax in float32.
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1).astype(jnp.int32)
    n = h.shape[0]
    c = max(1, min(chunk_size, n))
    pad = (-n) % c
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        t = jnp.pad(t, (0, pad), constant_values=IGNORE)
    h = h.reshape(-1, c, d)
    t = t.reshape(-1, c)

    @jax.checkpoint
    def chunk_loss(w, h_c, t_c):
        logits = jnp.einsum("nd,vd->nv", h_c, w.astype(h_c.dtype), preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        valid = t_c >= 0
        tgt = jnp.take_along_axis(logits, jnp.where(valid, t_c, 0)[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(valid, lse - tgt, 0.0)), jnp.sum(valid.astype(jnp.int32))

    def body(carry, xs):
        loss, count = chunk_loss(weight, *xs)
        return (carry[0] + loss, carry[1] + count), None

    (loss, count), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), (h, t))
    return loss, count


def naive_cross_entropy(hidden, weight, targets):
    """Reference: full logits, then the same sum/count (for tests)."""
    logits = jnp.einsum("bsd,vd->bsv", hidden, weight.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    valid = targets >= 0
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid.astype(jnp.int32))

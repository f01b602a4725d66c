"""Cross-entropy from final hidden states without materialising [B, S, V] logits.

The tokens are cut into chunks of `chunk_size`; a `lax.scan` computes each chunk's logits
[chunk, V] (hidden's dtype in, float32 accumulation), its log-sum-exp (one pass over the
logits) and target logit, and keeps only the two scalars: peak memory is one [chunk, V] block
instead of [B·S, V].

Under `jax.grad` the loss is a `custom_vjp` whose forward also computes the gradients, while
each chunk's logits are still live: dlogits = softmax − onehot, one elementwise pass, is cast to
the compute dtype and fed to two matmuls (d hidden, d weight). Against plain autodiff of the
chunk loop this saves re-computing the logits in the backward (3 vocabulary-sized matmuls
instead of 4) and keeps the backward matmuls in bf16: autodiff of a float32-accumulating
einsum carries float32 cotangents and runs them as tf32 GEMMs (measured on the H100: 125m at
16 × 1024 spent ~12 ms of a 42 ms step in the loss). The backward then only scales the
stored gradients by the incoming cotangent (a scalar). The lm_head gradient accumulates in
float32 and is returned in the weight's own dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from smedjan.backend import settings

IGNORE = -1  # targets below zero are not counted


def _chunked(hidden, targets, chunk_size):
    """hidden [.., D], targets [..] -> ([n, c, D], [n, c], n_tokens): n chunks of c ≤ chunk_size tokens.

    Chunk i holds the tokens i, i + n, i + 2n, ... (strided, not contiguous): under a mesh that
    splits the batch, every chunk then has rows on every device. A contiguous chunk of the
    flattened batch sits on one device, and XLA gathered the hidden states and ran the whole loss
    on every device (1b, data parallel on 2 H100s at batch 32: 114,915 -> 121,417 tok/s once
    strided). `_unchunk` inverts it.
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1).astype(jnp.int32)
    n_tok = h.shape[0]
    n = max(1, -(-n_tok // max(1, chunk_size)))
    c = -(-n_tok // n)
    pad = n * c - n_tok
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        t = jnp.pad(t, (0, pad), constant_values=IGNORE)
    return h.reshape(c, n, d).swapaxes(0, 1), t.reshape(c, n).swapaxes(0, 1), n_tok


def _unchunk(x, n_tok, shape):
    """[n, c, D] chunks (as `_chunked` made them) -> the original [.., D] layout."""
    return x.swapaxes(0, 1).reshape(-1, x.shape[-1])[:n_tok].reshape(shape)


def _logsumexp_rows(logits, one_pass: bool):
    """log Σ exp over the last axis in one read of `logits`: a variadic reduce carries each row's
    running max and its sum of exp(x − max), rescaling the smaller side's sum when two meet.
    jax.nn.logsumexp reads the logits twice, a max pass then a sum-exp pass: on the H100 at
    16384 × 32000 that was 0.69 + 0.69 ms against 0.89 ms for this one pass. XLA:CPU runs the two
    plain passes faster (the main job's step measured 2-8% slower with the variadic reduce), so other
    backends keep them (`smedjan.backend`'s one_pass_lse)."""
    if not one_pass:
        return jax.nn.logsumexp(logits, axis=-1)

    def combine(a, b):
        (m1, s1), (m2, s2) = a, b
        m = jax.lax.max(m1, m2)
        # equal maxima must scale by 1: both −inf (the identity, or a row of −inf) would give nan
        e = jnp.exp(jax.lax.select(m1 == m2, jnp.zeros_like(m), jax.lax.min(m1, m2) - m))
        return m, jax.lax.select(m1 >= m2, s1 + s2 * e, s1 * e + s2)

    init = (jnp.array(-jnp.inf, logits.dtype), jnp.array(0, logits.dtype))
    m, s = jax.lax.reduce((logits, jnp.ones_like(logits)), init, combine, (logits.ndim - 1,))
    return m + jnp.log(s)


def _chunk_stats(h_c, w, t_c, one_pass):
    """(logits f32 [c, V], lse [c], valid [c], loss sum, count) of one chunk."""
    logits = jnp.einsum("nd,vd->nv", h_c, w, preferred_element_type=jnp.float32)
    lse = _logsumexp_rows(logits, one_pass)
    valid = t_c >= 0
    tgt = jnp.take_along_axis(logits, jnp.where(valid, t_c, 0)[:, None], axis=-1)[:, 0]
    return logits, lse, valid, jnp.sum(jnp.where(valid, lse - tgt, 0.0)), jnp.sum(valid.astype(jnp.int32))


def _loss(hidden, weight, targets, chunk_size, one_pass):
    h, t, _ = _chunked(hidden, targets, chunk_size)
    w = weight.astype(hidden.dtype)

    def body(carry, xs):
        *_, loss, count = _chunk_stats(xs[0], w, xs[1], one_pass)
        return (carry[0] + loss, carry[1] + count), None

    (loss, count), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), (h, t))
    return loss, count


def _loss_fwd(hidden, weight, targets, chunk_size, one_pass):
    h, t, n = _chunked(hidden, targets, chunk_size)
    w = weight.astype(hidden.dtype)

    def body(carry, xs):
        loss_acc, count_acc, dw = carry
        h_c, t_c = xs
        logits, lse, valid, loss, count = _chunk_stats(h_c, w, t_c, one_pass)
        # softmax − onehot as one elementwise expression (the onehot from an iota compare, not a
        # scatter into the probabilities), so it is one pass: read f32 logits, write bf16 dlogits
        onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == t_c[:, None]
        dlogits = jnp.where(valid[:, None], jnp.exp(logits - lse[:, None]) - onehot, 0.0).astype(h_c.dtype)
        dh = jnp.einsum("nv,vd->nd", dlogits, w, preferred_element_type=jnp.float32).astype(h_c.dtype)
        dw = dw + jnp.einsum("nv,nd->vd", dlogits, h_c, preferred_element_type=jnp.float32)
        return (loss_acc + loss, count_acc + count, dw), dh

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros(weight.shape, jnp.float32))
    (loss, count, dw), dh = jax.lax.scan(body, init, (h, t))
    dh = _unchunk(dh, n, hidden.shape)
    return (loss, count), (dh, dw.astype(weight.dtype))


def _loss_bwd(chunk_size, one_pass, res, cts):
    dh, dw = res
    g = cts[0]  # the count output is an integer: no cotangent to carry
    return (dh * g.astype(dh.dtype)), (dw * g.astype(dw.dtype)), None


_loss_vjp = jax.custom_vjp(_loss, nondiff_argnums=(3, 4))
_loss_vjp.defvjp(_loss_fwd, _loss_bwd)


def chunked_cross_entropy(hidden, weight, targets, *, chunk_size: int = 1024, one_pass: bool | None = None):
    """(sum of token losses, number of counted tokens), both float32/int32 scalars.

    hidden [B, S, D] (any float dtype, e.g. bf16 compute), weight [V, D] (the lm_head / tied
    embedding), targets [B, S] int (negative = ignore). Logits are hidden · weightᵀ, computed
    in hidden's dtype with float32 accumulation, softmax in float32. one_pass: the log-sum-exp in one
    pass (`smedjan.backend`'s one_pass_lse; None: the default backend's).
    """
    if one_pass is None:
        one_pass = settings().one_pass_lse
    return _loss_vjp(hidden, weight, targets, int(chunk_size), bool(one_pass))


def naive_cross_entropy(hidden, weight, targets):
    """Reference: full logits, then the same sum/count (for tests)."""
    logits = jnp.einsum("bsd,vd->bsv", hidden, weight.astype(hidden.dtype), preferred_element_type=jnp.float32)
    valid = targets >= 0
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid.astype(jnp.int32))


def token_logprobs(hidden, weight, targets, *, chunk_size: int = 1024):
    """log p(target) of every token, [B, S] float32 (0 where the target is ignored), for sequence
    scores (DPO). The same chunking as the loss: one chunk's [c, V] logits at a time, recomputed in
    the backward (`jax.checkpoint`), so [B, S, V] never exists."""
    h, t, n = _chunked(hidden, targets, chunk_size)
    w = weight.astype(hidden.dtype)
    one_pass = settings().one_pass_lse

    @jax.checkpoint
    def one(xs):
        h_c, t_c = xs
        logits = jnp.einsum("nd,vd->nv", h_c, w, preferred_element_type=jnp.float32)
        valid = t_c >= 0
        tgt = jnp.take_along_axis(logits, jnp.where(valid, t_c, 0)[:, None], axis=-1)[:, 0]
        return jnp.where(valid, tgt - _logsumexp_rows(logits, one_pass), 0.0)

    lp = jax.lax.map(one, (h, t))
    return _unchunk(lp[..., None], n, (*targets.shape, 1))[..., 0]


def distillation_loss(hidden, weight, t_hidden, t_weight, targets, *, temperature, alpha, chunk_size: int = 1024):
    """(Σ α·T²·KL(teacher_T ‖ student_T) + (1−α)·CE, Σ KL·T², Σ CE, counted tokens) over tokens whose target
    is counted. teacher_T/student_T are softmaxes of logits / T; the student has `hidden` [B, S, D] and
    head `weight` [V, D], the teacher its own `t_hidden` [B, S, D'] and `t_weight` [V, D'] (any depth or
    width, one vocabulary). Chunked over tokens like the loss: one chunk's two [c, V] logit blocks at a
    time, recomputed in the backward; the teacher gets no gradient."""
    h, t, _ = _chunked(hidden, targets, chunk_size)
    ht, _, _ = _chunked(jax.lax.stop_gradient(t_hidden), targets, chunk_size)
    w = weight.astype(hidden.dtype)
    wt = jax.lax.stop_gradient(t_weight).astype(t_hidden.dtype)
    inv_t = 1.0 / temperature
    one_pass = settings().one_pass_lse

    @jax.checkpoint
    def one(xs):
        h_c, ht_c, t_c = xs
        ls = jnp.einsum("nd,vd->nv", h_c, w, preferred_element_type=jnp.float32)
        lt = jnp.einsum("nd,vd->nv", ht_c, wt, preferred_element_type=jnp.float32)
        valid = t_c >= 0
        ce = _logsumexp_rows(ls, one_pass) - jnp.take_along_axis(ls, jnp.where(valid, t_c, 0)[:, None], axis=-1)[:, 0]
        log_ps = jax.nn.log_softmax(ls * inv_t, axis=-1)
        log_pt = jax.nn.log_softmax(lt * inv_t, axis=-1)
        kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1) * temperature**2
        kl, ce = jnp.where(valid, kl, 0.0), jnp.where(valid, ce, 0.0)
        return jnp.stack([jnp.sum(alpha * kl + (1 - alpha) * ce), jnp.sum(kl), jnp.sum(ce)])

    sums = jnp.sum(jax.lax.map(one, (h, ht, t)), axis=0)
    return sums[0], sums[1], sums[2], jnp.sum(targets >= 0)

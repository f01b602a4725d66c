"""The jitted training step, optimizer and train state: the public API `smedjan bench` imports.

Typical use::

    from smedjan.runconfig import OptimConfig, ScheduleConfig
    from smedjan.train.step import make_optimizer, init_train_state, make_train_step

    opt = make_optimizer(OptimConfig(lr=3e-4), ScheduleConfig(warmup_steps=100), total_steps=1000)
    state = init_train_state(model_cfg, jax.random.key(0), opt, mesh=mesh)
    step = make_train_step(model_cfg, opt, remat="dots", grad_accum=2, mesh=mesh)
    state, metrics = step(state, {"tokens": tokens})   # tokens int32 [B, S+1]

`metrics` are device scalars ({"loss", "grad_norm", "tokens"}); fetch them only when logging.
"""

from __future__ import annotations

import re
from functools import partial, wraps
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from smedjan.backend import settings
from smedjan.config import ModelConfig
from smedjan.model.transformer import forward, init_params, lm_head, param_shapes
from smedjan.runconfig import OptimConfig, ScheduleConfig
from smedjan.train.loss import chunked_cross_entropy


class TrainState(NamedTuple):
    """A pytree: fp32 master params (flat HF-named dict), optax state, step (int32 scalar)."""

    params: dict
    opt_state: Any
    step: jax.Array


def make_schedule(optim: OptimConfig, schedule: ScheduleConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per step: warmup to `optim.lr`, then cosine / constant / warmup-stable-decay."""
    total = max(1, total_steps)
    warm = min(max(0, schedule.warmup_steps), total - 1) if total > 1 else 0
    lr, floor = optim.lr, optim.lr * schedule.min_lr_ratio
    if schedule.kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(total, warm + 1), end_value=floor)
    if schedule.kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warm, 1)), optax.constant_schedule(lr)], [warm])
    if schedule.kind == "wsd":
        decay = max(1, int(round(total * schedule.decay_fraction)))
        stable = max(0, total - warm - decay)
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, lr, max(warm, 1)),
                optax.constant_schedule(lr),
                optax.linear_schedule(lr, floor, decay),
            ],
            [warm, warm + stable],
        )
    raise ValueError(f"schedule must be cosine, wsd or constant, got {schedule.kind!r}")


_NO_DECAY = re.compile(r"(norm\.weight|\.bias|embed_tokens\.weight)$")


def decay_mask(params: dict) -> dict:
    """True where weight decay applies: matrices, except embeddings; never norms or biases."""
    return {k: not _NO_DECAY.search(k) for k in params}


def make_optimizer(
    optim: OptimConfig, schedule: ScheduleConfig | None = None, total_steps: int = 1000
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the schedule, decay masked by parameter name."""
    schedule = schedule or ScheduleConfig()
    parts = []
    if optim.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.clip_norm))
    lr = make_schedule(optim, schedule, total_steps)
    parts.append(
        optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts)


# ---- state -------------------------------------------------------------------------------------------
def _init_fn(model_cfg, optimizer, param_dtype):
    def init(key):
        params = init_params(model_cfg, key, param_dtype)
        return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))

    return init


def state_shardings(model_cfg: ModelConfig, optimizer, mesh, param_dtype=jnp.float32):
    """NamedShardings for every leaf of the TrainState on `mesh` (see smedjan.sharding)."""
    from smedjan.sharding import param_shardings, tree_shardings

    abstract = jax.eval_shape(_init_fn(model_cfg, optimizer, param_dtype), jax.random.key(0))
    return tree_shardings(abstract, param_shardings(param_shapes(model_cfg), mesh), mesh)


def init_train_state(model_cfg: ModelConfig, key, optimizer, param_dtype=jnp.float32, mesh=None) -> TrainState:
    """Fresh params (`init_params`) and optimizer state, created already sharded when `mesh` is given."""
    init = _init_fn(model_cfg, optimizer, param_dtype)
    if mesh is None:
        return jax.jit(init)(key)
    return jax.jit(init, out_shardings=state_shardings(model_cfg, optimizer, mesh, param_dtype))(key)


def _global_norm(tree):
    tree_mod = getattr(optax, "tree", None)
    if tree_mod is not None and hasattr(tree_mod, "norm"):
        return tree_mod.norm(tree)
    return optax.global_norm(tree)


# ---- the step ------------------------------------------------------------------------------------------
def split_batch(batch) -> tuple[jax.Array, jax.Array]:
    if "tokens" in batch:
        tokens = batch["tokens"]
        return tokens[:, :-1], tokens[:, 1:]
    return batch["inputs"], batch["targets"]


def speed_knobs(
    model_cfg: ModelConfig, remat: str = "auto", loss_chunk: int | None = None, scan_unroll: int | bool | None = None
) -> tuple[str, int, int | bool]:
    """Resolve remat="auto", loss_chunk=None and scan_unroll=None to the best measured setting.

    On an H100 (benchmarks/RESULTS.md, 125m at 16 x 1024, same run): remat "dots" with
    16k-token loss chunks ran 345k tok/s against 264k for no remat with 1k chunks; saving only
    the matmul outputs and recomputing the elementwise work beats storing everything, and big
    chunks keep the LM-head matmuls large. A chunk's fp32 logits are capped at 2 GiB. A fully
    unrolled layer loop then gave another +13% (the step becomes one CUDA graph, no per-layer
    slicing of stacked weights and residuals). On CPU, memory and compile time are the scarcer
    resources: no remat, 1k chunks, a rolled `lax.scan`.
    """
    backend = settings()
    gpu = backend.platform == "gpu"
    if remat == "auto":
        remat = "dots" if gpu else "none"
    if not loss_chunk:
        loss_chunk = 1024
        if gpu:
            while loss_chunk * 2 * model_cfg.vocab_size * 4 <= 2**31 and loss_chunk < 16384:
                loss_chunk *= 2
    if scan_unroll is None:
        scan_unroll = backend.scan_unroll
    return remat, loss_chunk, scan_unroll


def loss_and_count(
    params,
    inputs,
    targets,
    model_cfg,
    *,
    attn_impl="auto",
    remat="auto",
    compute_dtype=jnp.bfloat16,
    loss_chunk=None,
    scan_unroll=None,
):
    """(sum of token losses, counted tokens) of one batch, via the chunked cross-entropy."""
    remat, loss_chunk, scan_unroll = speed_knobs(model_cfg, remat, loss_chunk, scan_unroll)
    hidden = forward(
        params,
        inputs,
        model_cfg,
        attn_impl=attn_impl,
        remat=remat,
        compute_dtype=compute_dtype,
        return_hidden=True,
        scan_unroll=scan_unroll,
    )
    return chunked_cross_entropy(hidden, lm_head(params, model_cfg), targets, chunk_size=loss_chunk)


def _traced_in(mesh, fn):
    """`fn` traced under `mesh_context(mesh)` (Pallas kernels then run per device)."""
    if mesh is None:
        return fn
    from smedjan.sharding import mesh_context

    @wraps(fn)
    def traced(*args):
        with mesh_context(mesh):
            return fn(*args)

    return traced


def _mesh_loss_chunk(model_cfg, loss_chunk, mesh):
    """The default loss chunk bounds one device's logits; a batch split over the mesh's data and fsdp
    axes gives each device 1/shards of every chunk (`loss._chunked`), so the chunk grows to match."""
    if loss_chunk or mesh is None:
        return loss_chunk
    from smedjan.sharding import batch_divisor

    return speed_knobs(model_cfg)[1] * batch_divisor(mesh)


def make_train_step(
    model_cfg: ModelConfig,
    optimizer,
    *,
    attn_impl: str = "auto",
    remat: str = "auto",
    compute_dtype=jnp.bfloat16,
    grad_accum: int = 1,
    loss_chunk: int | None = None,
    mesh=None,
    param_dtype=jnp.float32,
    donate: bool = True,
    scan_unroll: int | bool | None = None,
):
    """A jitted `step(state, batch) -> (state, metrics)`.

    batch: {"tokens": int32 [B, S+1]} (inputs = tokens[:, :-1], targets = tokens[:, 1:]) or
    {"inputs": int32 [B, S], "targets": int32 [B, S]} (targets < 0 are ignored).
    B must divide by `grad_accum` (and, with a mesh, B/grad_accum by data·fsdp). The loss is the
    mean over every counted token of the whole batch, so accumulation equals one big batch.
    compute_dtype: bf16 forward/backward over fp32 master weights (None: compute in param dtype).
    mesh: a smedjan.sharding mesh; state and batch then carry NamedShardings (in/out shardings
    of the jit), the batch split over (data, fsdp).
    The state argument is donated (its buffers are reused for the new state).
    metrics: {"loss": mean token loss, "grad_norm": pre-clip global norm, "tokens": counted tokens}.
    """
    if grad_accum < 1:
        raise ValueError("grad_accum must be >= 1")
    loss_chunk = _mesh_loss_chunk(model_cfg, loss_chunk, mesh)
    lc = partial(
        loss_and_count,
        model_cfg=model_cfg,
        attn_impl=attn_impl,
        remat=remat,
        compute_dtype=compute_dtype,
        loss_chunk=loss_chunk,
        scan_unroll=scan_unroll,
    )
    micro_spec = None
    if mesh is not None:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from smedjan.sharding import BATCH_AXES

        micro_spec = NamedSharding(mesh, P(None, BATCH_AXES, None))

    def scaled_loss(params, inputs, targets, denom):
        s, n = lc(params, inputs, targets)
        return s / denom, s

    grad_fn = jax.grad(scaled_loss, has_aux=True)

    def step(state: TrainState, batch):
        inputs, targets = split_batch(batch)
        inputs = inputs.astype(jnp.int32)
        targets = targets.astype(jnp.int32)
        n_tokens = jnp.sum(targets >= 0)
        denom = jnp.maximum(n_tokens, 1).astype(jnp.float32)
        if grad_accum == 1:
            grads, loss_sum = grad_fn(state.params, inputs, targets, denom)
        else:
            b = inputs.shape[0]
            if b % grad_accum:
                raise ValueError(f"batch size {b} does not divide by grad_accum {grad_accum}")
            # microbatch i = rows i, i+A, i+2A, ...: every microbatch spans every data shard
            mi = inputs.reshape(b // grad_accum, grad_accum, -1).swapaxes(0, 1)
            mt = targets.reshape(b // grad_accum, grad_accum, -1).swapaxes(0, 1)
            if micro_spec is not None:
                mi = jax.lax.with_sharding_constraint(mi, micro_spec)
                mt = jax.lax.with_sharding_constraint(mt, micro_spec)

            def micro(carry, xs):
                g_acc, l_acc = carry
                g, l = grad_fn(state.params, xs[0], xs[1], denom)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            (grads, loss_sum), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)), (mi, mt))
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        grad_norm = _global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm, "tokens": n_tokens}
        return TrainState(params, opt_state, state.step + 1), metrics

    step = _traced_in(mesh, step)
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    from smedjan.sharding import batch_sharding, replicated

    st_sh = state_shardings(model_cfg, optimizer, mesh, param_dtype)
    rep = replicated(mesh)
    b_sh = batch_sharding(mesh)
    return jax.jit(
        step,
        donate_argnums=donate_argnums,
        in_shardings=(st_sh, b_sh),
        out_shardings=(st_sh, {"loss": rep, "grad_norm": rep, "tokens": rep}),
    )


def make_eval_step(
    model_cfg: ModelConfig,
    *,
    attn_impl: str = "auto",
    compute_dtype=jnp.bfloat16,
    loss_chunk: int | None = None,
    mesh=None,
    param_dtype=jnp.float32,
):
    """Jitted `eval(params, batch) -> (loss_sum, count)` (same batch formats as the train step)."""

    loss_chunk = _mesh_loss_chunk(model_cfg, loss_chunk, mesh)

    def ev(params, batch):
        inputs, targets = split_batch(batch)
        return loss_and_count(
            params,
            inputs.astype(jnp.int32),
            targets.astype(jnp.int32),
            model_cfg,
            attn_impl=attn_impl,
            compute_dtype=compute_dtype,
            loss_chunk=loss_chunk,
        )

    ev = _traced_in(mesh, ev)
    if mesh is None:
        return jax.jit(ev)
    from smedjan.sharding import batch_sharding, param_shardings, replicated

    p_sh = param_shardings(param_shapes(model_cfg), mesh)
    rep = replicated(mesh)
    return jax.jit(ev, in_shardings=(p_sh, batch_sharding(mesh)), out_shardings=(rep, rep))

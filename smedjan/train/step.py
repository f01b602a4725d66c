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
from functools import wraps
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from smedjan.backend import settings
from smedjan.config import ModelConfig
from smedjan.model.transformer import init_params, param_shapes
from smedjan.runconfig import OptimConfig, ScheduleConfig
from smedjan.train.objectives import Forward
from smedjan.train.objectives.lm import LM


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
def _trainable_shapes(model_cfg, lora=None) -> dict:
    """Shapes of what the optimizer trains: every model parameter, or only the LoRA adapters."""
    if lora is None:
        return param_shapes(model_cfg)
    from smedjan.model.lora import adapter_shapes

    return adapter_shapes(param_shapes(model_cfg), lora)


def _init_fn(model_cfg, optimizer, param_dtype, lora=None):
    def init(key):
        if lora is None:
            params = init_params(model_cfg, key, param_dtype)
        else:
            from smedjan.model.lora import init_adapters

            params = init_adapters(param_shapes(model_cfg), lora, key, param_dtype)
        return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))

    return init


def state_shardings(model_cfg: ModelConfig, optimizer, mesh, param_dtype=jnp.float32, lora=None):
    """NamedShardings for every leaf of the TrainState on `mesh` (see smedjan.sharding)."""
    from smedjan.sharding import param_shardings, tree_shardings

    abstract = jax.eval_shape(_init_fn(model_cfg, optimizer, param_dtype, lora), jax.random.key(0))
    return tree_shardings(abstract, param_shardings(_trainable_shapes(model_cfg, lora), mesh), mesh)


def init_train_state(
    model_cfg: ModelConfig, key, optimizer, param_dtype=jnp.float32, mesh=None, lora=None, params=None
) -> TrainState:
    """Fresh params (`init_params`; with `lora`, fresh adapters) and optimizer state, created already
    sharded when `mesh` is given. `params`: start from these instead (fine-tuning a checkpoint)."""
    init = _init_fn(model_cfg, optimizer, param_dtype, lora)
    if params is not None:
        key = params
        init = lambda p: TrainState(p, optimizer.init(p), jnp.zeros((), jnp.int32))  # noqa: E731
    # placed as the step's outputs will be (a state placed otherwise would make the step compile twice)
    if mesh is None:
        return jax.jit(init)(key)
    return jax.jit(init, out_shardings=state_shardings(model_cfg, optimizer, mesh, param_dtype, lora))(key)


def _global_norm(tree):
    tree_mod = getattr(optax, "tree", None)
    if tree_mod is not None and hasattr(tree_mod, "norm"):
        return tree_mod.norm(tree)
    return optax.global_norm(tree)


# ---- the step ------------------------------------------------------------------------------------------
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
    fw = forward_knobs(model_cfg, attn_impl, remat, compute_dtype, loss_chunk, scan_unroll)
    batch = {"inputs": inputs, "targets": targets}
    return LM().loss(fw, params, batch)[0], LM().count(batch)


def forward_knobs(model_cfg, attn_impl, remat, compute_dtype, loss_chunk, scan_unroll) -> Forward:
    remat, loss_chunk, scan_unroll = speed_knobs(model_cfg, remat, loss_chunk, scan_unroll)
    return Forward(model_cfg, attn_impl, remat, compute_dtype, loss_chunk, scan_unroll)


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


def _model_params(trainable, frozen, lora, key=None):
    """What the model runs with: the trained params, or the frozen base with the trained adapters attached."""
    if lora is None:
        return trainable
    from smedjan.model.lora import attach

    return attach(frozen["base"], trainable, lora, key)


def _microbatches(batch, grad_accum, mesh):
    """Every batch array [B, ...] -> [A, B/A, ...]; micro-batch i = rows i, i+A, ...: each spans every data shard."""

    def split(a):
        b = a.shape[0]
        if b % grad_accum:
            raise ValueError(f"batch size {b} does not divide by grad_accum {grad_accum}")
        m = a.reshape(b // grad_accum, grad_accum, *a.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            from smedjan.sharding import BATCH_AXES

            m = jax.lax.with_sharding_constraint(m, NamedSharding(mesh, P(None, BATCH_AXES)))
        return m

    return jax.tree.map(split, batch)


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
    objective=None,
    lora=None,
    seed: int = 0,
):
    """A jitted `step(state, batch, frozen=None) -> (state, metrics)`.

    objective: what is minimised (smedjan.train.objectives; default LM, the pre-training loss). For LM,
    batch is {"tokens": int32 [B, S+1]} (inputs = tokens[:, :-1], targets = tokens[:, 1:]) or
    {"inputs", "targets"} [B, S] (targets < 0 are ignored), optionally with "segment_ids"/"positions"
    (packed rows). The loss is the objective's sum over the whole batch divided by its count (target
    tokens, pairs), so accumulation equals one big batch.
    lora: a LoraConfig: state.params are then the adapters and frozen["base"] the model weights (never
    updated; optimizer state exists only for the adapters). frozen: {"base": ..., "teacher": ...} as the
    run needs them (`frozen_shardings` places them on a mesh).
    B must divide by `grad_accum` (and, with a mesh, B/grad_accum by data·fsdp).
    compute_dtype: bf16 forward/backward over fp32 master weights (None: compute in param dtype).
    mesh: a smedjan.sharding mesh; state and batch then carry NamedShardings (in/out shardings
    of the jit), the batch split over (data, fsdp).
    The state argument is donated (its buffers are reused for the new state).
    A step whose loss or gradient norm is not finite changes nothing but the step counter: its update
    is dropped (metrics["skipped"] = 1) so one bad batch cannot poison the weights or Adam's moments.
    metrics: {"loss": mean loss, "grad_norm": pre-clip global norm, "tokens": the count, "skipped",
    and the objective's metrics as means over the count}.
    """
    if grad_accum < 1:
        raise ValueError("grad_accum must be >= 1")
    objective = objective or LM()
    fw = forward_knobs(
        model_cfg, attn_impl, remat, compute_dtype, _mesh_loss_chunk(model_cfg, loss_chunk, mesh), scan_unroll
    )
    dropout = lora is not None and lora.dropout > 0

    def scaled_loss(trainable, frozen, batch, denom, key):
        s, aux = objective.loss(fw, _model_params(trainable, frozen, lora, key), batch, frozen)
        return s / denom, (s, aux)

    grad_fn = jax.grad(scaled_loss, has_aux=True)

    def step(state: TrainState, batch, frozen):
        count = objective.count(batch)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        key = jax.random.fold_in(jax.random.key(seed), state.step) if dropout else None
        if grad_accum == 1:
            grads, (loss_sum, aux) = grad_fn(state.params, frozen, batch, denom, key)
        else:
            micro = _microbatches(batch, grad_accum, mesh)

            def body(carry, xs):
                i, mb = xs
                g, (l, a) = grad_fn(
                    state.params, frozen, mb, denom, None if key is None else jax.random.fold_in(key, i)
                )
                return jax.tree.map(jnp.add, carry, (g, l, a)), None

            zeros = jax.eval_shape(
                lambda: grad_fn(state.params, frozen, jax.tree.map(lambda m: m[0], micro), denom, key)
            )
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), (zeros[0], zeros[1][0], zeros[1][1]))
            (grads, loss_sum, aux), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        grad_norm = _global_norm(grads)
        ok = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params, opt_state = jax.tree.map(
            lambda new, old: jnp.where(ok, new, old), (params, opt_state), (state.params, state.opt_state)
        )
        metrics = {
            "loss": loss_sum / denom,
            "grad_norm": grad_norm,
            "tokens": count,
            "skipped": jnp.logical_not(ok).astype(jnp.int32),
            **{k: v / denom for k, v in aux.items()},
        }
        return TrainState(params, opt_state, state.step + 1), metrics

    step = _traced_in(mesh, step)
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        jitted = jax.jit(step, donate_argnums=donate_argnums)
    else:
        from smedjan.sharding import replicated

        st_sh = state_shardings(model_cfg, optimizer, mesh, param_dtype, lora)
        rep = replicated(mesh)
        jitted = jax.jit(
            step,
            donate_argnums=donate_argnums,
            in_shardings=(st_sh, _batch_sharding(mesh), frozen_shardings(model_cfg, objective, lora, mesh)),
            out_shardings=(st_sh, rep),
        )

    @wraps(step)
    def call(state, batch, frozen=None):
        return jitted(state, batch, frozen)

    return call


def frozen_shardings(model_cfg, objective, lora, mesh):
    """Placement of the `frozen` step argument: {"base": the model's (LoRA), "teacher": the teacher's}."""
    from smedjan.sharding import param_shardings

    sh = {}
    if lora is not None:
        sh["base"] = param_shardings(param_shapes(model_cfg), mesh)
    teacher_cfg = getattr(objective, "teacher_cfg", None)
    if teacher_cfg is not None:
        sh["teacher"] = param_shardings(param_shapes(teacher_cfg), mesh)
    return sh or None


def _batch_sharding(mesh):
    """Every batch array split over (data, fsdp) on its first axis, whatever its rank."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from smedjan.sharding import BATCH_AXES

    return NamedSharding(mesh, P(BATCH_AXES))


def make_eval_step(
    model_cfg: ModelConfig,
    *,
    attn_impl: str = "auto",
    compute_dtype=jnp.bfloat16,
    loss_chunk: int | None = None,
    mesh=None,
    param_dtype=jnp.float32,
    objective=None,
    lora=None,
):
    """Jitted `eval(params, batch, frozen=None) -> (loss_sum, count, {metric: sum})` (batches and
    objective as for the train step; with `lora`, params are the adapters and frozen["base"] the model)."""
    objective = objective or LM()
    fw = forward_knobs(model_cfg, attn_impl, "none", compute_dtype, _mesh_loss_chunk(model_cfg, loss_chunk, mesh), None)

    def ev(params, batch, frozen):
        s, aux = objective.loss(fw, _model_params(params, frozen, lora), batch, frozen)
        return s, objective.count(batch), aux

    ev = _traced_in(mesh, ev)
    if mesh is None:
        jitted = jax.jit(ev)
    else:
        from smedjan.sharding import param_shardings, replicated

        rep = replicated(mesh)
        p_sh = param_shardings(_trainable_shapes(model_cfg, lora), mesh)
        jitted = jax.jit(
            ev,
            in_shardings=(p_sh, _batch_sharding(mesh), frozen_shardings(model_cfg, objective, lora, mesh)),
            out_shardings=rep,
        )

    def call(params, batch, frozen=None):
        return jitted(params, batch, frozen)

    return call

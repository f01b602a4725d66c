"""Device meshes and partition rules: JAX's own sharding (GSPMD), no hand-written collectives.

The mesh has three axes:

* ``data``   -- pure data parallelism: parameters replicated, the batch split;
* ``fsdp``   -- fully-sharded data parallelism: the batch split *and* every matrix's largest
  dimension (other than the tensor-parallel one) split, so parameters, gradients and AdamW
  state are stored once across the axis and gathered by XLA when used;
* ``tensor`` -- Megatron-style tensor parallelism: q/k/v/gate/up split on their output
  (heads / ffn) dimension, o/down on their input dimension, embeddings and lm_head on vocab.

Parameter names are HF names; the stacked layer axis (dim 0 of "model.layers.*") is never
split. A dimension is only split when the axis size divides it, otherwise it stays whole.

``--mesh data=2,fsdp=4`` picks the shape (one axis may be -1: "the rest"); the default puts
every device on ``data``. The same code runs on one CPU, on fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set before jax is imported) and GPUs.

Multi-host: start one process per host with the same command plus ``--distributed``; that
calls `jax.distributed.initialize()`, which reads

* ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
  (and optionally ``JAX_LOCAL_DEVICE_IDS``, comma-separated) when set, passed explicitly; or
* whatever the cluster provides when they are not (SLURM, Open MPI, Cloud TPU auto-detection).

The mesh then spans every process's devices; each process loads only its rows of the batch.
"""

from __future__ import annotations

import contextlib
import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on the HF name, which non-layer dim is split over `tensor`; None = no tensor split).
PARTITION_RULES: list[tuple[str, int | None]] = [
    (r"^model\.embed_tokens\.weight$", 0),  # [V, D]: vocab-parallel
    (r"^lm_head\.weight$", 0),  # [V, D]: vocab-parallel
    (r"self_attn\.[qkv]_proj\.weight$", 0),  # [out=heads*hd, D]: column-parallel
    (r"self_attn\.[qkv]_proj\.bias$", 0),
    (r"self_attn\.o_proj\.weight$", 1),  # [D, heads*hd]: row-parallel
    (r"self_attn\.o_proj\.bias$", None),
    (r"mlp\.(gate|up)_proj\.weight$", 0),  # [F, D]: column-parallel
    (r"mlp\.down_proj\.weight$", 1),  # [D, F]: row-parallel
    (r"norm\.weight$", None),  # every RMSNorm scale: replicated
    # LoRA: B [out, r] follows a column-parallel weight's out dim, A [r, in] a row-parallel one's in dim
    (r"(self_attn\.[qkv]|mlp\.(gate|up))_proj\.lora_B\.weight$", 0),
    (r"(self_attn\.o|mlp\.down)_proj\.lora_A\.weight$", 1),
    (r"lora_[AB]\.weight$", None),
]


class ShardingError(ValueError):
    pass


# ---- meshes ----------------------------------------------------------------------------------------
def parse_mesh_spec(spec: str | dict | None, n_devices: int) -> dict[str, int]:
    """ "data=2,fsdp=4" -> {"data": 2, "fsdp": 4, "tensor": 1}; default all devices on data."""
    if spec is None or spec == "" or spec == {}:
        return {"data": n_devices, "fsdp": 1, "tensor": 1}
    if isinstance(spec, str):
        sizes = {}
        for part in spec.split(","):
            if "=" not in part:
                raise ShardingError(f"--mesh: expected axis=size, got {part!r}")
            name, value = (s.strip() for s in part.split("=", 1))
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ShardingError(f"--mesh: size of {name!r} must be an integer, got {value!r}") from None
    else:
        sizes = dict(spec)
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ShardingError(f"--mesh: unknown axis {unknown[0]!r}; axes are {AXES}")
    sizes = {a: sizes.get(a, 1) for a in AXES}
    free = [a for a, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ShardingError("--mesh: at most one axis may be -1")
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ShardingError(f"--mesh: sizes must be positive, got {sizes}")
    if free:
        if n_devices % fixed:
            raise ShardingError(f"--mesh: {n_devices} devices do not divide by {fixed}")
        sizes[free[0]] = n_devices // fixed
    if int(np.prod(list(sizes.values()))) != n_devices:
        raise ShardingError(f"--mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, there are {n_devices}")
    return sizes


def make_mesh(spec: str | dict | None = None, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    if devices == list(jax.devices()):
        try:  # topology-aware device order (NVLink / ICI neighbours on the fast axes)
            from jax.sharding import AxisType

            return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))
        except (TypeError, ImportError, ValueError):
            pass
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)


def mesh_context(mesh: Mesh | None):
    """While a step is traced: `mesh` as the abstract mesh, so kernels that GSPMD cannot split (Pallas
    calls) run per device through `shard_map` (`smedjan.model.attention.per_device`)."""
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def initialize_distributed() -> None:
    """`jax.distributed.initialize()` from JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID if set."""
    try:  # collectives between CPU devices of different processes (the default runs only within one)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):
        pass
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        kwargs = dict(
            coordinator_address=addr,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
        if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
            kwargs["local_device_ids"] = [int(i) for i in os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
        jax.distributed.initialize(**kwargs)
    else:
        jax.distributed.initialize()


# ---- partition rules ---------------------------------------------------------------------------------
def partition_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of one parameter (HF name, stacked shape) on `mesh`."""
    rule = next(((dim,) for pattern, dim in PARTITION_RULES if re.search(pattern, name)), None)
    if rule is None:
        raise ShardingError(f"no partition rule matches parameter {name!r}")
    (tensor_dim,) = rule
    stacked = name.startswith("model.layers.")
    offset = 1 if stacked else 0
    dims = shape[offset:]
    spec: list = [None] * len(dims)
    tp, fs = mesh.shape["tensor"], mesh.shape["fsdp"]
    if tensor_dim is not None and tp > 1 and dims[tensor_dim] % tp == 0:
        spec[tensor_dim] = "tensor"
    if len(dims) >= 2 and fs > 1:
        # fsdp: the largest dim not already split over tensor (first on ties)
        candidates = [i for i in range(len(dims)) if spec[i] is None and dims[i] % fs == 0]
        if candidates:
            spec[max(candidates, key=lambda i: (dims[i], -i))] = "fsdp"
    return P(*([None] * offset + spec))


def param_specs(shapes: dict[str, tuple[int, ...]], mesh: Mesh) -> dict[str, P]:
    return {name: partition_spec(name, tuple(shape), mesh) for name, shape in shapes.items()}


def param_shardings(shapes_or_params: dict, mesh: Mesh) -> dict[str, NamedSharding]:
    """{name: NamedSharding} for a dict of shapes or of arrays."""
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes_or_params.items()}
    return {k: NamedSharding(mesh, s) for k, s in param_specs(shapes, mesh).items()}


def batch_spec(ndim: int = 2) -> P:
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batches: rows split over (data, fsdp), replicated over tensor."""
    return NamedSharding(mesh, batch_spec(ndim))


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def tree_shardings(abstract_tree, shardings_by_name: dict[str, NamedSharding], mesh: Mesh):
    """Shardings for any pytree holding parameter-shaped leaves under parameter-name dict keys.

    Optimizer states (AdamW mu/nu, ...) mirror the params dict, so a leaf whose path holds a
    parameter name and whose shape matches that parameter gets the parameter's sharding;
    every other leaf (step counters, scalars) is replicated.
    """
    rep = replicated(mesh)

    def pick(path, leaf):
        for entry in reversed(path):
            key = getattr(entry, "key", None)
            if isinstance(key, str) and key in shardings_by_name:
                sh = shardings_by_name[key]
                return sh if _ndim_ok(leaf, sh) else rep
        return rep

    return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def _ndim_ok(leaf, sharding: NamedSharding) -> bool:
    return len(getattr(leaf, "shape", ())) == len(sharding.spec) or not any(sharding.spec)


def put_batch(array: np.ndarray, sharding: NamedSharding | None):
    """Host rows -> a global device array. Single process: `array` is the whole batch;
    multi-process: `array` is this process's rows (see `process_rows`)."""
    if sharding is None:
        return jax.device_put(array)
    if jax.process_count() == 1:
        return jax.device_put(array, sharding)
    return jax.make_array_from_process_local_data(sharding, array)


def process_rows(batch_size: int) -> slice:
    """The rows of a global batch that this process feeds."""
    n, i = jax.process_count(), jax.process_index()
    per = batch_size // n
    return slice(i * per, (i + 1) * per)

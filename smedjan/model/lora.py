"""LoRA: a trainable low-rank update beside a frozen linear projection, y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ.

Adapters are a parameter pytree of their own, named and stacked like the base parameters
("model.layers.self_attn.q_proj.lora_A.weight" holds every layer's A as [L, r, in]; B is
[L, out, r], PEFT's layouts with the layer index dropped), so `smedjan.peft` maps them to PEFT's
tensor names by unstacking, exactly as checkpoint.py does for the base.

The model sees adapters through its parameter dict: `attach` adds, per layer, A, B pre-scaled by
s = alpha / r (alpha / √r with rsLoRA) and, for dropout, a per-layer key; `layers.project`
(and the joined q/k/v and gate/up paths) add `delta` wherever those entries exist. The forward has
no LoRA argument and a base without adapters runs exactly as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

LAYER_PREFIX = "model.layers."
MODULES = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
ALL_TARGETS = tuple(MODULES)
KEY = "lora_dropout.key"  # per-layer raw PRNG key data (present only while training with dropout)
KEEP = "lora_dropout.keep"  # per-layer keep probability


class LoraError(ValueError):
    pass


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_TARGETS
    rslora: bool = False

    def __post_init__(self):
        if self.rank < 1:
            raise LoraError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in MODULES]
        if bad or not self.targets:
            raise LoraError(f"LoRA targets must be among {', '.join(ALL_TARGETS)}; got {list(self.targets)}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @staticmethod
    def parse_targets(spec: str | None) -> tuple[str, ...]:
        """ "all-linear"/None -> every projection; "attn"/"mlp" -> that block's; else a comma list."""
        if not spec or spec in ("all", "all-linear"):
            return ALL_TARGETS
        if spec in ("attn", "attention", "mlp"):
            return tuple(k for k, m in MODULES.items() if m == ("mlp" if spec == "mlp" else "self_attn"))
        return tuple(t.strip() for t in spec.split(",") if t.strip())


def module_name(target: str) -> str:
    """ "q_proj" -> "self_attn.q_proj" (the name inside a layer)."""
    return f"{MODULES[target]}.{target}"


def adapter_shapes(base_shapes: dict, lcfg: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Stacked A [L, r, in] and B [L, out, r] for each target, from the base's parameter shapes."""
    shapes = {}
    for t in lcfg.targets:
        n, out, inp = base_shapes[f"{LAYER_PREFIX}{module_name(t)}.weight"]
        shapes[f"{LAYER_PREFIX}{module_name(t)}.lora_A.weight"] = (n, lcfg.rank, inp)
        shapes[f"{LAYER_PREFIX}{module_name(t)}.lora_B.weight"] = (n, out, lcfg.rank)
    return shapes


def init_adapters(base_shapes: dict, lcfg: LoraConfig, key, dtype=jnp.float32) -> dict[str, jax.Array]:
    """PEFT's initialisation: A ~ U(±1/√in) (kaiming-uniform, a=√5), B = 0, so training starts at the base."""
    shapes = adapter_shapes(base_shapes, lcfg)
    keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
    out = {}
    for name, shape in shapes.items():
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(shape[-1])
            out[name] = jax.random.uniform(keys[name], shape, jnp.float32, -bound, bound).astype(dtype)
        else:
            out[name] = jnp.zeros(shape, dtype)
    return out


def attach(params: dict, adapters: dict, lcfg: LoraConfig, key=None) -> dict:
    """The parameter dict the model runs with: the base, the adapters (B pre-scaled) and, when `key` is
    given and lcfg.dropout > 0, per-layer dropout keys."""
    out = dict(params)
    for name, value in adapters.items():
        out[name] = value * lcfg.scale if ".lora_B." in name else value
    if key is not None and lcfg.dropout > 0:
        n = next(iter(adapters.values())).shape[0]
        out[LAYER_PREFIX + KEY] = jax.random.key_data(jax.random.split(key, n))
        out[LAYER_PREFIX + KEEP] = jnp.full((n,), 1.0 - lcfg.dropout, jnp.float32)
    return out


ROWS = "lora.rows"  # serving several adapters at once: each batch row's adapter index (see `stack`)


def stack(adapters: list[tuple[dict, LoraConfig]], base_shapes: dict) -> dict:
    """Several adapters as one pytree the model serves in one batch: per target projection A [L, N+1, r, in]
    and B [L, N+1, out, r] (B pre-scaled), index 0 the base (zeros), index i the i-th adapter; ranks padded
    to the largest with zeros (exact). A forward given each row's index (`ROWS`) adds that row's update."""
    targets = sorted({t for _, lcfg in adapters for t in lcfg.targets}, key=ALL_TARGETS.index)
    rank = max(lcfg.rank for _, lcfg in adapters)
    out = {}
    for t in targets:
        base = f"{LAYER_PREFIX}{module_name(t)}"
        n, o, i = base_shapes[f"{base}.weight"]
        a = np.zeros((n, len(adapters) + 1, rank, i), np.float32)
        b = np.zeros((n, len(adapters) + 1, o, rank), np.float32)
        for j, (ad, lcfg) in enumerate(adapters, start=1):
            if t in lcfg.targets:
                a[:, j, : lcfg.rank] = np.asarray(ad[f"{base}.lora_A.weight"], np.float32)
                b[:, j, :, : lcfg.rank] = np.asarray(ad[f"{base}.lora_B.weight"], np.float32) * lcfg.scale
        out[f"{base}.lora_A.weight"], out[f"{base}.lora_B.weight"] = jnp.asarray(a), jnp.asarray(b)
    return out


def delta(x, p: dict, name: str):
    """s·(drop(x)·Aᵀ)·Bᵀ for projection `name` ("self_attn.q_proj") of one layer's params, or None."""
    a = p.get(f"{name}.lora_A.weight")
    if a is None:
        return None
    if ROWS in p:  # stacked adapters: row b uses adapter p[ROWS][b] (0: the base, a zero update)
        rows = p[ROWS]
        h = jnp.einsum("b...i,bri->b...r", x, a[rows].astype(x.dtype))
        return jnp.einsum("b...r,bor->b...o", h, p[f"{name}.lora_B.weight"][rows].astype(x.dtype))
    if KEY in p:
        key = jax.random.fold_in(jax.random.wrap_key_data(p[KEY]), ALL_TARGETS.index(name.split(".")[-1]))
        keep = p[KEEP].astype(jnp.float32)
        mask = jax.random.bernoulli(key, keep, x.shape)
        x = jnp.where(mask, x / keep.astype(x.dtype), 0).astype(x.dtype)
    h = jnp.einsum("...i,ri->...r", x, a.astype(x.dtype))
    return jnp.einsum("...r,or->...o", h, p[f"{name}.lora_B.weight"].astype(x.dtype))


def merge(params: dict, adapters: dict, lcfg: LoraConfig) -> dict:
    """W + s·B·A for every adapted projection (a plain parameter dict, e.g. to export or to serve)."""
    out = dict(params)
    for t in lcfg.targets:
        base = f"{LAYER_PREFIX}{module_name(t)}"
        a = adapters[f"{base}.lora_A.weight"].astype(jnp.float32)
        b = adapters[f"{base}.lora_B.weight"].astype(jnp.float32)
        w = params[f"{base}.weight"]
        out[f"{base}.weight"] = (w.astype(jnp.float32) + lcfg.scale * jnp.einsum("lor,lri->loi", b, a)).astype(w.dtype)
    return out

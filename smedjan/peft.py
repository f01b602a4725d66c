"""LoRA adapters in PEFT's folder format: adapter_config.json + adapter_model.safetensors.

Tensor names are PEFT's, ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``
(A [r, in], B [out, r]), unstacked from smedjan's [L, ...] adapter arrays, so
``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)`` loads
them, and ``base_model_name_or_path`` lets ``AutoModelForCausalLM.from_pretrained(folder)`` find
the base by itself. Reading accepts what `peft` writes for a plain LoRA on the projections:
target_modules as a list or a regex, a subset of layers (the other layers' A and B are zero),
rsLoRA. DoRA, per-module rank/alpha patterns, trained biases and extra saved modules are
refused with a message rather than silently dropped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from smedjan.checkpoint import CheckpointError, replace_dir
from smedjan.model.lora import ALL_TARGETS, LAYER_PREFIX, LoraConfig, adapter_shapes, module_name

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_NP = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def peft_config(lcfg: LoraConfig, base_model_name_or_path: str | None) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": lcfg.rank,
        "lora_alpha": lcfg.alpha,
        "lora_dropout": lcfg.dropout,
        "target_modules": list(lcfg.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": lcfg.rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(
    folder: str | os.PathLike,
    adapters: dict,
    lcfg: LoraConfig,
    *,
    base_model_name_or_path: str | None = None,
    dtype=jnp.float32,
) -> Path:
    """Write a PEFT adapter folder (atomically: a temporary sibling renamed into place)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp-save")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    np_dtype = _NP[jnp.dtype(dtype).name]
    tensors = {}
    for name, value in adapters.items():
        arr = np.asarray(jax.device_get(value)).astype(np_dtype)
        rest = name[len(LAYER_PREFIX) :]
        for i in range(arr.shape[0]):
            tensors[f"{PREFIX}{LAYER_PREFIX}{i}.{rest}"] = np.ascontiguousarray(arr[i])
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / CONFIG).write_text(json.dumps(peft_config(lcfg, base_model_name_or_path), indent=2))
    return replace_dir(tmp, folder, old_suffix=".old-save")


def _targets(conf: dict, folder: Path) -> tuple[str, ...]:
    tm = conf.get("target_modules")
    if isinstance(tm, str):
        if tm == "all-linear":
            return ALL_TARGETS
        pat = re.compile(tm)
        return tuple(t for t in ALL_TARGETS if pat.fullmatch(f"model.layers.0.{module_name(t)}") or pat.fullmatch(t))
    if isinstance(tm, list) and tm:
        names = tuple(t.split(".")[-1] for t in tm)
        bad = [t for t in names if t not in ALL_TARGETS]
        if bad:
            raise CheckpointError(f"{folder}/{CONFIG}: target_modules {bad} are not projections smedjan adapts")
        return tuple(t for t in ALL_TARGETS if t in names)
    raise CheckpointError(f"{folder}/{CONFIG}: no target_modules")


def read_config(folder: str | os.PathLike) -> tuple[LoraConfig, dict]:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG} (not a PEFT adapter folder)")
    try:
        conf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if conf.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type {conf.get('peft_type')!r}; only LORA adapters are read")
    unsupported = {
        "use_dora": bool(conf.get("use_dora")),
        "rank_pattern": bool(conf.get("rank_pattern")),
        "alpha_pattern": bool(conf.get("alpha_pattern")),
        "modules_to_save": bool(conf.get("modules_to_save")),
        "bias": conf.get("bias", "none") != "none",
        "fan_in_fan_out": bool(conf.get("fan_in_fan_out")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(f"{path}: {', '.join(bad)} not supported by smedjan's LoRA")
    lcfg = LoraConfig(
        rank=int(conf["r"]),
        alpha=float(conf.get("lora_alpha", conf["r"])),
        dropout=float(conf.get("lora_dropout") or 0.0),
        targets=_targets(conf, folder),
        rslora=bool(conf.get("use_rslora")),
    )
    return lcfg, conf


def load_adapter(folder: str | os.PathLike, model_cfg, dtype=jnp.float32) -> tuple[dict, LoraConfig]:
    """(adapters stacked [L, ...], LoraConfig) from a PEFT folder, for a base with `model_cfg`."""
    from smedjan.model.transformer import param_shapes

    folder = Path(folder)
    lcfg, _ = read_config(folder)
    path = folder / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS} (adapter_model.bin is not read)")
    shapes = adapter_shapes(param_shapes(model_cfg), lcfg)
    out = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    pattern = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(.+?)(?:\.default)?(\.weight)$")
    seen = set()
    with safe_open(str(path), framework="numpy") as f:
        for key in f.keys():
            m = pattern.match(key)
            name = m and f"{LAYER_PREFIX}{m.group(2)}{m.group(3)}"
            if not m or name not in out:
                raise CheckpointError(f"{path}: tensor {key!r} is not a LoRA A/B of the model's projections")
            i = int(m.group(1))
            arr = f.get_tensor(key)
            if i >= model_cfg.num_hidden_layers or arr.shape != out[name].shape[1:]:
                raise CheckpointError(
                    f"{path}: {key} has shape {arr.shape} (layer {i}); the base expects {out[name].shape[1:]} "
                    f"for {model_cfg.num_hidden_layers} layers (adapter for another model?)"
                )
            out[name][i] = arr.astype(np.float32)
            seen.add(name)
    if not seen:
        raise CheckpointError(f"{path}: no LoRA tensors")
    return {k: jnp.asarray(v, dtype) for k, v in out.items()}, lcfg


def base_of(folder: str | os.PathLike) -> str | None:
    """The base model recorded in an adapter folder (a hub id or a local path)."""
    return read_config(folder)[1].get("base_model_name_or_path")

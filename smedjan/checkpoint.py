"""Hugging Face checkpoint folders in and out: config.json + *.safetensors (+ tokenizer files).

Loading reads each tensor through safetensors' memory map and stacks the per-layer
tensors straight into smedjan's [layers, ...] arrays in the target dtype, so a full
second host copy of the checkpoint never exists. Every failure names the file and
the tensor.
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
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from smedjan.config import ConfigError, ModelConfig
from smedjan.model.transformer import LAYER_PREFIX, param_shapes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DEFAULT_SHARD_BYTES = 2 * 1024**3
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it stands."""


def resolve_path(path_or_repo: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder, or a hub repo id fetched through huggingface_hub (cache and HF_HUB_OFFLINE honoured)."""
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint folder, found a file")
    if str(path_or_repo).count("/") != 1 or str(path_or_repo).startswith((".", "/")):
        raise CheckpointError(f"{path_or_repo}: no such folder (and not a hub repo id of the form owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                str(path_or_repo),
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"],
            )
        )
    except Exception as e:  # network, auth, offline cache miss: all end the same way for the user
        raise CheckpointError(f"could not fetch {path_or_repo!r} from the hub: {e}") from None


def load_config(folder: str | os.PathLike) -> ModelConfig:
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    try:
        return ModelConfig.from_json_file(cfg_path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _weight_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        return {name: folder / fname for name, fname in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files (PyTorch .bin checkpoints are not read)")
    mapping = {}
    for f in files:
        with _open(f) as handle:
            mapping.update({k: f for k in handle.keys()})
    return mapping


def _open(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path}: file missing")
    try:
        return safe_open(str(path), framework="numpy")
    except SafetensorError as e:
        raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {e}") from None


def load_params(folder: str | os.PathLike, cfg: ModelConfig, dtype=None, shardings=None) -> dict[str, jax.Array]:
    """Read weights into smedjan's stacked layout.

    dtype: target dtype (default: keep the file's). shardings: optional {name: jax.sharding.Sharding};
    each array is then placed directly with that sharding.
    """
    folder = Path(folder)
    files = _weight_files(folder)
    handles: dict[Path, object] = {}

    def tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in files:
            raise CheckpointError(f"{folder}: tensor {name!r} missing from the checkpoint")
        path = files[name]
        if path not in handles:
            handles[path] = _open(path).__enter__()
        try:
            arr = handles[path].get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: tensor {name!r} unreadable: {e}") from None
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(arr.shape)}, config expects {shape}")
        return arr if dtype is None else arr.astype(jnp.dtype(dtype))

    expected = param_shapes(cfg)
    used = set()
    params = {}
    try:
        for name, shape in expected.items():
            if name.startswith(LAYER_PREFIX):
                rest = name[len(LAYER_PREFIX) :]
                per_layer = [f"{LAYER_PREFIX}{i}.{rest}" for i in range(cfg.num_hidden_layers)]
                arr = np.stack([tensor(n, shape[1:]) for n in per_layer])
                used.update(per_layer)
            else:
                arr = tensor(name, shape)
                used.add(name)
            sharding = None if shardings is None else shardings.get(name)
            params[name] = jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)

    extra = sorted(n for n in files if n not in used and not n.endswith("rotary_emb.inv_freq"))
    if cfg.tie_word_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # some exporters write the tied head twice
    if extra:
        raise CheckpointError(f"{folder}: tensors the config does not account for, e.g. {extra[:3]}")
    return params


def load_hf(path_or_repo: str | os.PathLike, dtype=None, revision: str | None = None, shardings=None):
    """(config, params) from a HF folder or hub repo id."""
    folder = resolve_path(path_or_repo, revision)
    cfg = load_config(folder)
    return cfg, load_params(folder, cfg, dtype=dtype, shardings=shardings)


def hf_tensors(params: dict, dtype=jnp.bfloat16):
    """Yield (HF name, numpy array) with per-layer tensors unstacked."""
    np_dtype = _NP_DTYPES[jnp.dtype(dtype).name]
    for name, value in params.items():
        arr = np.asarray(jax.device_get(value)).astype(np_dtype)
        if name.startswith(LAYER_PREFIX):
            rest = name[len(LAYER_PREFIX) :]
            for i in range(arr.shape[0]):
                yield f"{LAYER_PREFIX}{i}.{rest}", np.ascontiguousarray(arr[i])
        else:
            yield name, arr


def save_hf(
    folder: str | os.PathLike,
    cfg: ModelConfig,
    params: dict,
    *,
    tokenizer_dir=None,
    dtype=jnp.bfloat16,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    generation_config: dict | None = None,
):
    """Write a HF folder that transformers' AutoModelForCausalLM loads with no custom code.

    Written to a temporary sibling and renamed, so an interrupted save never leaves a
    half-written checkpoint under the final name.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp-save")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in hf_tensors(params, dtype):
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors without it
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata=metadata)
            weight_map.update({k: fname for k in shard})
        total = sum(a.nbytes for s in shards for a in s.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )

    hf_cfg = cfg.to_hf_dict()
    hf_cfg["dtype"] = jnp.dtype(dtype).name
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    gen = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        **(generation_config or {}),
    }
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / fname
            if src.is_file():
                shutil.copy2(src, tmp / fname)
    return replace_dir(tmp, folder, old_suffix=".old-save")


def replace_dir(tmp: Path, final: Path, old_suffix: str = ".old") -> Path:
    """Move a fully written `tmp` folder to `final`, replacing any previous one.

    Renames only: at every instant either the old or the new folder is complete under
    its name, so a crash never leaves a half-written folder where a reader looks.
    """
    if final.exists():
        old = final.with_name(final.name + old_suffix)
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final

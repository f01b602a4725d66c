"""Hugging Face checkpoint folders in and out: config.json + *.safetensors (+ tokenizer files).

Loading reads each tensor through safetensors' memory map and stacks the per-layer
tensors straight into smedjan's [layers, ...] arrays in the target dtype, so a full
second host copy of the checkpoint never exists. Every failure names the file and
the tensor.

A folder is data, not code, and may come from anyone: shard names from the index must stay
inside the folder (no absolute paths, no `..`; symlinks inside it, as in a hub cache snapshot,
are followed), parameters must be stored as floats, and every tensor is checked for NaN/Inf.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from smedjan.config import ConfigError, ModelConfig
from smedjan.errors import UserError
from smedjan.model.transformer import LAYER_PREFIX, param_shapes
from smedjan.quant.qweight import QuantizedWeight, is_quantized

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DEFAULT_SHARD_BYTES = 2 * 1024**3
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# safetensors dtype -> bytes per element, and the float dtypes a parameter may be stored in
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_ST_FLOATS = {"F32", "F16", "BF16", "F64"}


class CheckpointError(UserError, ValueError):
    """A checkpoint folder that cannot be loaded as it stands."""


def resolve_path(path_or_repo: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder, or a hub repo id fetched through huggingface_hub (cache and HF_HUB_OFFLINE honoured)."""
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint folder, found a file")
    if str(path_or_repo).count("/") != 1 or str(path_or_repo).startswith((".", "/", "~")):
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
        why = " ".join(str(e).split())[:300] or type(e).__name__
        raise CheckpointError(
            f"{path_or_repo}: neither a local folder (no such folder here) nor a hub repo id that could be "
            f"fetched ({type(e).__name__}: {why})"
        ) from None


def read_quantization_config(folder: str | os.PathLike) -> dict | None:
    """config.json's `quantization_config` (smedjan's own; `ModelConfig` refuses any other), or None."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


# Weight file names: "model" as transformers expects; a quantized folder's are "quantized", so that
# transformers (which does not know smedjan's quant_method and would otherwise load the folder with
# the quantized layers left at random init) finds no weights and refuses it.
WEIGHT_STEMS = ("model", "quantized")
# A quantized weight "<base>.weight" is stored as these tensors (QuantizedWeight's fields), per layer.
QUANT_PARTS = ("qweight", "scales", "offsets", "in_scale")


def _quant_names(name: str) -> dict[str, str]:
    base = name[: -len("weight")]
    return {part: base + part for part in QUANT_PARTS}


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
    index = next((i for i in (folder / f"{stem}.safetensors.index.json" for stem in WEIGHT_STEMS) if i.is_file()), None)
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:  # JSON, UTF-8, not an object, no weight_map
            raise CheckpointError(f"{index}: malformed index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must be an object of tensor name -> file name")
        return {name: _shard_path(folder, index, fname) for name, fname in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files (PyTorch .bin checkpoints are not read)")
    mapping = {}
    for f in files:
        with _open(f) as handle:
            mapping.update({k: f for k in handle.keys()})
    return mapping


def _shard_path(folder: Path, index: Path, fname: str) -> Path:
    """A shard named by the index, refused unless the name stays inside the folder. The name is
    checked, not the resolved path: a hub cache snapshot holds symlinks into ../../blobs."""
    p = PurePosixPath(fname)
    if not fname or p.is_absolute() or PureWindowsPath(fname).is_absolute() or "\\" in fname or ".." in p.parts:
        raise CheckpointError(f"{index}: shard {fname!r} is not a file name inside the model folder; refused")
    return folder / p


def _open(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path}: file missing")
    try:
        return safe_open(str(path), framework="numpy")
    except SafetensorError as e:
        why = _header_problem(path) or f"unreadable safetensors file (truncated or corrupt?): {e}"
        raise CheckpointError(f"{path}: {why}") from None


def _header_problem(path: Path) -> str | None:
    """Name the tensor whose header entry does not add up (safetensors only says that one does not):
    a dtype or shape edited in the header changes the byte size it implies."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(n, 1 << 27)))
        entries = [(k, v["dtype"], v["shape"], v["data_offsets"]) for k, v in header.items() if k != "__metadata__"]
    except Exception:
        return None
    for name, dtype, shape, (begin, end) in entries:
        size = _ST_ITEMSIZE.get(dtype)
        if size is not None and math.prod(shape) * size != end - begin:
            return (
                f"tensor {name!r}: the header says {dtype} {shape} ({math.prod(shape) * size} bytes) but it "
                f"holds {end - begin} bytes (header edited or corrupt)"
            )
    return None


def load_params(folder: str | os.PathLike, cfg: ModelConfig, dtype=None, shardings=None) -> dict[str, jax.Array]:
    """Read weights into smedjan's stacked layout.

    dtype: target dtype (default: keep the file's). shardings: optional {name: jax.sharding.Sharding};
    each array is then placed directly with that sharding.
    """
    folder = Path(folder)
    files = _weight_files(folder)
    handles: dict[Path, object] = {}

    from_f64: list[str] = []  # tensors narrowed from float64 (one warning for all)
    stored_as: dict[str, list[str]] = {}  # stored float dtype -> tensor names (a lone odd dtype is suspicious)

    def read(name: str):
        """(the stored dtype's safetensors name, the array as stored)."""
        path = files[name]
        if path not in handles:
            handles[path] = _open(path).__enter__()
        try:
            return handles[path].get_slice(name).get_dtype(), handles[path].get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: tensor {name!r} unreadable: {e}") from None

    def stored_names(name: str) -> list[str]:
        """The file's names for `name`: one per layer for stacked tensors."""
        if not name.startswith(LAYER_PREFIX):
            return [name]
        return [f"{LAYER_PREFIX}{i}.{name[len(LAYER_PREFIX) :]}" for i in range(cfg.num_hidden_layers)]

    def tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in files:
            raise CheckpointError(f"{folder}: tensor {name!r} missing from the checkpoint")
        path = files[name]
        stored, raw = read(name)
        if stored not in _ST_FLOATS:
            raise CheckpointError(f"{path}: tensor {name!r} is stored as {stored}; parameters must be floats")
        if tuple(raw.shape) != tuple(shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(raw.shape)}, config expects {shape}")
        target = jnp.dtype(dtype) if dtype is not None else jnp.dtype(np.float32) if stored == "F64" else raw.dtype
        if stored == "F64":
            from_f64.append(name)
        stored_as.setdefault(stored, []).append(name)
        with np.errstate(over="ignore"):  # an overflow shows as Inf just below, named
            arr = raw.astype(target, copy=False)
        if not np.isfinite(arr).all():  # one pass; a NaN weight would only show later as empty output
            after = f" after conversion to {target.name}" if arr is not raw and np.isfinite(raw).all() else ""
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN or Inf values{after}")
        return arr

    expected = param_shapes(cfg)
    quant = read_quantization_config(folder)
    used = set()
    params = {}

    def quantized(name: str, shape: tuple[int, ...]) -> QuantizedWeight:
        """Its parts stacked per layer as stored (their dtypes are the format's: never cast)."""
        arrays = {}
        for part, pname in _quant_names(name).items():
            names = stored_names(pname)
            if names[0] not in files:
                if part in ("qweight", "scales"):
                    raise CheckpointError(f"{folder}: tensor {names[0]!r} missing (quantized {name})")
                continue
            parts = []
            for n in names:
                kind, arr = read(n)
                if kind not in (("I8", "U8") if part == "qweight" else _ST_FLOATS) or (
                    part != "qweight" and not np.isfinite(arr).all()
                ):
                    raise CheckpointError(f"{files[n]}: quantized tensor {n!r} ({kind}) is not valid for its part")
                parts.append(arr)
            arrays[part] = jnp.asarray(np.stack(parts) if name.startswith(LAYER_PREFIX) else parts[0])
            used.update(names)
        q = arrays.pop("qweight")
        bits = 8 if q.dtype == np.int8 else 4
        w = QuantizedWeight(
            q=q,
            **arrays,
            bits=bits,
            group_size=int(quant.get("group_size", 0)) if bits == 4 else 0,
            in_features=shape[-1],
        )
        k_rows = shape[-1] if bits == 8 else -(-shape[-1] // w.group_size) * w.group_size // 2
        if q.shape[-2:] != (k_rows, shape[-2]):
            raise CheckpointError(
                f"{folder}: quantized {name!r} has shape {q.shape}, config expects {shape} ({bits}-bit)"
            )
        return w

    try:
        for name, shape in expected.items():
            if name.endswith(".weight") and stored_names(_quant_names(name)["qweight"])[0] in files:
                if quant is None:
                    raise CheckpointError(f"{folder}: quantized tensors but no quantization_config in config.json")
                params[name] = quantized(name, shape)
                continue
            if name.startswith(LAYER_PREFIX):
                per_layer = stored_names(name)
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

    if from_f64:
        warnings.warn(
            f"{folder}: {len(from_f64)} tensors stored as float64 (e.g. {from_f64[0]!r}) were converted to "
            f"{jnp.dtype(dtype or np.float32).name}",
            stacklevel=2,
        )
    if len(stored_as) > 1:
        # A BF16 header edited to F16 keeps its byte size and so reads without error, as garbage: the only
        # trace is a tensor whose dtype differs from its neighbours'. Mixed files exist (fp32 norms), so warn.
        counts = sorted(stored_as.items(), key=lambda kv: -len(kv[1]))
        odd = counts[-1]
        warnings.warn(
            f"{folder}: tensors stored in mixed dtypes ({', '.join(f'{len(v)} {k}' for k, v in counts)}; e.g. "
            f"{odd[1][0]!r} is {odd[0]}), all converted to {jnp.dtype(dtype).name if dtype is not None else 'their own'}"
            f"; if the file was not written that way, its header may have been edited",
            stacklevel=2,
        )
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
    """Yield (HF name, numpy array) with per-layer tensors unstacked; a quantized weight as its parts
    (`QUANT_PARTS`, in their own dtypes)."""
    np_dtype = None if dtype is None else _NP_DTYPES[jnp.dtype(dtype).name]
    for name, value in params.items():
        if is_quantized(value):
            parts = {"qweight": value.q, "scales": value.scales, "offsets": value.offsets, "in_scale": value.in_scale}
            for part, pname in _quant_names(name).items():
                if parts[part] is not None:
                    yield from hf_tensors({pname: np.asarray(jax.device_get(parts[part]))}, None)
            continue
        arr = np.asarray(jax.device_get(value))
        arr = arr if dtype is None else arr.astype(np_dtype)
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
    run_info: dict | None = None,
    quantization_config: dict | None = None,
):
    """Write a HF folder that transformers' AutoModelForCausalLM loads with no custom code.

    run_info: what produced the weights (data, steps, losses); saved as smedjan_run.json, which the
    model card that `smedjan push` writes reads.

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
    stem = WEIGHT_STEMS[quantization_config is not None]
    if len(shards) == 1:
        save_safetensors(shards[0], tmp / f"{stem}.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, tmp / fname)
            weight_map.update({k: fname for k in shard})
        total = sum(a.nbytes for s in shards for a in s.values())
        (tmp / f"{stem}.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )

    hf_cfg = cfg.to_hf_dict()
    hf_cfg["dtype"] = jnp.dtype(dtype).name
    if quantization_config is not None:
        hf_cfg["quantization_config"] = quantization_config
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    gen = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        **(generation_config or {}),
    }
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if run_info:
        (tmp / "smedjan_run.json").write_text(json.dumps(run_info, indent=2, default=str))
    if tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / fname
            if src.is_file():
                shutil.copy2(src, tmp / fname)
    return replace_dir(tmp, folder, old_suffix=".old-save")


def save_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """safetensors' save_file, with the file mode every other file gets (it writes 0600 via a temp file)."""
    save_file(tensors, str(path), metadata={"format": "pt"})  # transformers refuses safetensors without "format"
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


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

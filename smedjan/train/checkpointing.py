"""Training checkpoints: the whole TrainState in one safetensors file + JSON metadata.

Layout: ``RUN/checkpoints/step_00001000/{state.safetensors, meta.json}``. Each tensor is named by
its pytree path (``.params['model.norm.weight']``, ``.opt_state[1][0].mu['...']``, ``.step``).
A checkpoint is written into ``step_XXXXXXXX.tmp`` and renamed into place only once both files
are complete and fsync'ed, so a crash mid-write leaves the previous checkpoint intact (and the
half-written temp folder is ignored, then removed by the next save). The newest `keep` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from smedjan.checkpoint import CheckpointError, replace_dir

CKPT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _host(leaf) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        leaf = multihost_utils.process_allgather(leaf, tiled=True)
    return np.asarray(jax.device_get(leaf))


def flatten_state(state) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    return {jax.tree_util.keystr(path): np.array(_host(leaf), order="C") for path, leaf in leaves}  # keeps 0-d


def checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / "meta.json").is_file() and (p / "state.safetensors").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str | os.PathLike, state, meta: dict, keep: int = 3) -> Path:
    """Write `state` (any pytree) + `meta` atomically; prune to the newest `keep`. Returns the folder."""
    tensors = flatten_state(state)  # every process takes part in gathering sharded arrays
    step = int(meta["step"])
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step_{step:08d}"
    if jax.process_index() != 0:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(tensors, str(tmp / "state.safetensors"), metadata={"format": "smedjan-train-state"})
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    with open(tmp / "state.safetensors", "rb") as f:
        os.fsync(f.fileno())
    replace_dir(tmp, final)  # replaces when re-saving a step (e.g. a stop right after a periodic save)
    _fsync_dir(root)
    for p in root.iterdir():  # leftovers of interrupted saves
        if p.name.endswith((".tmp", ".old")) and p != tmp:
            shutil.rmtree(p, ignore_errors=True)
    if keep and keep > 0:
        for _, p in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def read_meta(ckpt: str | os.PathLike) -> dict:
    return json.loads((Path(ckpt) / "meta.json").read_text())


def load_checkpoint(ckpt: str | os.PathLike, template, shardings=None):
    """(state, meta): tensors read back into `template`'s structure (arrays or ShapeDtypeStructs).

    shardings: a pytree of Shardings matching `template` (or None: default device).
    """
    ckpt = Path(ckpt)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    sh_leaves = jax.tree_util.tree_leaves(shardings) if shardings is not None else [None] * len(leaves)
    out = []
    path = ckpt / "state.safetensors"
    try:
        handle = safe_open(str(path), framework="numpy")
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint: {e}") from None
    with handle as f:
        names = set(f.keys())
        for (p, leaf), sh in zip(leaves, sh_leaves):
            name = jax.tree_util.keystr(p)
            if name not in names:
                raise CheckpointError(f"{path}: tensor {name} missing (was the model or optimizer changed?)")
            arr = f.get_tensor(name)
            if tuple(arr.shape) != tuple(leaf.shape):
                raise CheckpointError(f"{path}: {name} has shape {arr.shape}, the run expects {tuple(leaf.shape)}")
            arr = arr.astype(leaf.dtype)
            out.append(jax.device_put(arr, sh) if sh is not None else jax.device_put(arr))
    return jax.tree_util.tree_unflatten(treedef, out), read_meta(ckpt)

"""Training checkpoints: the TrainState written sharded and in the background by orbax-checkpoint.

Layout::

    RUN/checkpoints/step_00001000/
        state/          orbax (OCDBT): every process writes the shards it holds, nothing is gathered
        meta.json       step, data position, seed, configs (what resume and `export-hf` read)
        manifest.json   sha256 and size of every file above, so damage is found and named on resume

A save copies the arrays to host memory and returns; the files are written by a background thread
while training goes on (`CheckpointWriter`). Everything lands in ``step_XXXXXXXX.tmp`` first and is
renamed into place only once orbax has committed every process's shards and meta/manifest are
fsync'ed, so a crash mid-write leaves the previous checkpoint intact (the half-written temp folder
is ignored, then removed by the next save). The newest `keep` are kept. Restoring onto another mesh
(1 device <-> FSDP, CPU <-> GPU) is orbax's resharding: each process reads the pieces it needs.

Checkpoints of the earlier format (one ``state.safetensors`` of the gathered state) are still read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from smedjan.checkpoint import CheckpointError, replace_dir

CKPT_DIR = "checkpoints"
STATE = "state"  # orbax item folder
META = "meta.json"
MANIFEST = "manifest.json"
LEGACY_STATE = "state.safetensors"  # the format before orbax: the whole state gathered into one file
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


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)  # releases the GIL: files hash in parallel threads
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hash_files(files: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(_sha256, files))


def write_manifest(folder: Path) -> None:
    files = _files(folder)
    digests = _hash_files(files)
    entries = {str(p.relative_to(folder)): {"sha256": d, "bytes": p.stat().st_size} for p, d in zip(files, digests)}
    _write_json(folder / MANIFEST, {"format": "smedjan-train-checkpoint-v2", "files": entries})


def verify_manifest(folder: Path) -> None:
    """Raise CheckpointError naming the first missing, truncated or changed file."""
    path = folder / MANIFEST
    try:
        entries = json.loads(path.read_text())["files"]
        if not all(isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in entries.values()):
            raise TypeError
        if any(Path(n).is_absolute() or ".." in Path(n).parts for n in entries):
            raise ValueError  # names stay inside the checkpoint
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (every checkpoint of this format has one)") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path}: not a valid manifest") from None
    names = sorted(entries)
    for name in names:
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (listed in {MANIFEST})")
        if p.stat().st_size != entries[name].get("bytes"):
            raise CheckpointError(
                f"{p}: {p.stat().st_size} bytes, {entries[name].get('bytes')} were written (truncated or changed)"
            )
    for name, digest in zip(names, _hash_files([folder / n for n in names])):
        if digest != entries[name]["sha256"]:
            raise CheckpointError(f"{folder / name}: checksum mismatch (the file changed after it was written)")


# ---- finding checkpoints ---------------------------------------------------------------------------------
def checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every checkpoint folder (step_XXXXXXXX, damaged ones too; temp folders of unfinished saves not), oldest
    first. `check_checkpoint` says whether one is intact."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def read_meta(ckpt: str | os.PathLike) -> dict:
    """meta.json of a checkpoint, checked: an object with an integer `step` equal to the folder's."""
    path = Path(ckpt) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: no integer 'step' (found {step!r})")
    m = _STEP_RE.match(Path(ckpt).name)
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"{path}: step {step} but the folder is {Path(ckpt).name}")
    return meta


def check_checkpoint(ckpt: str | os.PathLike) -> dict:
    """The meta of an intact checkpoint; else CheckpointError saying what is wrong, in one line."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    if (ckpt / STATE).is_dir():
        verify_manifest(ckpt)
    elif not (ckpt / LEGACY_STATE).is_file():
        raise CheckpointError(f"{ckpt}: no {STATE}/ folder (the saved train state)")
    return meta


# ---- saving ----------------------------------------------------------------------------------------------
class CheckpointWriter:
    """Saves train states of one run: sharded (each process writes its own shards) and in the background.

    `save` returns once the next step may run (and donate its buffers): with `device_copy`, after a copy
    of the state on the devices themselves (milliseconds; the copy to host memory then runs in the
    background too, at the price of a second state on the devices until it is done), else after
    orbax has copied the arrays to host memory (1b on an H200: 8.9 s of 20.7 s). One save is in
    flight at a time, and `wait` (or the next `save`) re-raises what went wrong in it. Call `close`
    before the process ends: it waits for the last save. `seconds` of the newest save: "blocking"
    (the training thread's stall), "total" (until on disk).
    """

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, asynchronous: bool = True, device_copy: bool = False):
        import orbax.checkpoint as ocp

        self.root = Path(run_dir).absolute() / CKPT_DIR  # orbax refuses relative paths (`--out runs/x`)
        self.keep = keep
        self.asynchronous = asynchronous
        self.device_copy = device_copy
        self._ocp = ocp
        self._orbax = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._copy = None  # with device_copy: the state copy that the background thread saves
        self.last_step: int | None = None
        self.seconds: dict[str, float] = {}

    def save(self, state, meta: dict) -> Path:
        step = int(meta["step"])
        final = self.root / f"step_{step:08d}"
        if step == self.last_step:  # e.g. a stop right after a periodic save: it is already written
            return final
        self.wait()
        t0 = time.perf_counter()
        tmp = self.root / f"step_{step:08d}.tmp"
        if jax.process_index() == 0 and tmp.exists():
            shutil.rmtree(tmp)  # the remains of an interrupted save (before orbax creates anything in it)
        self._copy = _device_copy(state) if self.device_copy else None
        if self._copy is None:
            self._orbax.save(tmp / STATE, args=self._ocp.args.StandardSave(state))
        self.last_step = step
        self.seconds = {}
        self._thread = threading.Thread(target=self._finish, args=(tmp, final, dict(meta), t0), daemon=False)
        self._thread.start()
        self.seconds["blocking"] = time.perf_counter() - t0
        if not self.asynchronous:
            self.wait()
        return final

    def _finish(self, tmp: Path, final: Path, meta: dict, t0: float) -> None:
        try:
            if self._copy is not None:
                self._orbax.save(tmp / STATE, args=self._ocp.args.StandardSave(self._copy))
                self._copy = None  # orbax holds host copies now: the devices' second state is freed
            self._orbax.wait_until_finished()  # every process's shards are committed
            if jax.process_index() != 0:
                return
            _write_json(tmp / META, meta)
            write_manifest(tmp)
            replace_dir(tmp, final)  # replaces when re-saving a step
            _fsync_dir(self.root)
            self._prune()
            self.seconds["total"] = time.perf_counter() - t0
        except BaseException as e:  # re-raised in the training thread by wait()
            self._error = e

    def _prune(self) -> None:
        for p in self.root.iterdir():  # leftovers of interrupted saves
            if p.name.endswith((".tmp", ".old")):
                shutil.rmtree(p, ignore_errors=True)
        if self.keep and self.keep > 0:
            for _, p in checkpoints(self.root.parent)[: -self.keep]:
                shutil.rmtree(p, ignore_errors=True)

    @property
    def in_flight(self) -> bool:
        """A save is still being written."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the save in flight is on disk (renamed into place); raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"saving a checkpoint in {self.root} failed: {err}") from err
        if jax.process_count() > 1:  # no process moves on (or exits) before process 0 has renamed it
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("smedjan_checkpoint_written")

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._orbax.close()


def _copy_tree(tree):
    return jax.tree.map(jnp.copy, tree)


def _device_copy(state):
    """A copy of `state` made on its devices (same shardings), or None when it does not fit there."""
    shardings = jax.tree.map(lambda a: a.sharding, state)
    try:
        copy = jax.jit(_copy_tree, out_shardings=shardings)(state)
        return jax.block_until_ready(copy)
    except Exception as e:  # out of device memory: orbax copies to host memory on this thread instead
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        return None


def save_checkpoint(run_dir: str | os.PathLike, state, meta: dict, keep: int = 3) -> Path:
    """Write `state` (any pytree of arrays) + `meta` and wait until it is on disk. Returns the folder."""
    writer = CheckpointWriter(run_dir, keep=keep, asynchronous=False)
    try:
        return writer.save(state, meta)
    finally:
        writer.close()


# ---- loading ---------------------------------------------------------------------------------------------
def _restore_target(template, shardings):
    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: dev, template)
    return jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), template, shardings)


def _orbax_error(path: Path, e: Exception) -> CheckpointError:
    text = " ".join(str(e).split())
    return CheckpointError(f"{path}: cannot restore the train state ({type(e).__name__}: {text[:300]})")


def load_checkpoint(ckpt: str | os.PathLike, template, shardings=None, verify: bool = True):
    """(state, meta): the saved state in `template`'s structure (arrays or ShapeDtypeStructs).

    shardings: a pytree of Shardings matching `template` (None: the default device); the mesh may
    differ from the one that saved it. verify: check the manifest's checksums first.
    """
    ckpt = Path(ckpt).absolute()  # orbax refuses relative paths
    meta = check_checkpoint(ckpt) if verify else read_meta(ckpt)
    if not (ckpt / STATE).is_dir():
        return _load_legacy(ckpt, template, shardings), meta
    import orbax.checkpoint as ocp

    target = _restore_target(template, shardings)
    try:
        with ocp.StandardCheckpointer() as reader:
            saved = reader.metadata(ckpt / STATE).item_metadata.tree
            _check_shapes(ckpt, saved, template)
            state = reader.restore(ckpt / STATE, target)
    except CheckpointError:
        raise
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise _orbax_error(ckpt / STATE, e) from None
    return state, meta


def _check_shapes(ckpt: Path, saved, template) -> None:
    """A clear error for a run whose model or optimizer differs from the checkpoint's."""
    shapes = {}

    def walk(prefix: str, node) -> None:  # orbax's tree metadata: namedtuples as dicts, tuples as lists
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
        if items is None:
            if node is not None:
                shapes[prefix] = tuple(node.shape)
            return
        for k, v in items:
            walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", saved)
    for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if name not in shapes:
            raise CheckpointError(f"{ckpt}: tensor {name} missing (was the model or optimizer changed?)")
        if shapes[name] != tuple(leaf.shape):
            raise CheckpointError(f"{ckpt}: {name} has shape {shapes[name]}, the run expects {tuple(leaf.shape)}")


def load_params(ckpt: str | os.PathLike, names: dict[str, tuple], verify: bool = True) -> dict[str, np.ndarray]:
    """Only the parameters (`names`: HF name -> expected shape) as numpy, for export: no optimizer state
    is read, no device used."""
    ckpt = Path(ckpt).absolute()  # orbax refuses relative paths
    (check_checkpoint if verify else read_meta)(ckpt)
    if not (ckpt / STATE).is_dir():
        return _legacy_params(ckpt, names)
    import orbax.checkpoint as ocp

    try:
        saved = ocp.StandardCheckpointer().metadata(ckpt / STATE).item_metadata.tree["params"]
    except Exception as e:
        raise _orbax_error(ckpt / STATE, e) from None
    for name, shape in names.items():
        if name not in saved:
            raise CheckpointError(f"{ckpt}: parameter {name} missing")
        if tuple(saved[name].shape) != tuple(shape):
            raise CheckpointError(f"{ckpt}: {name} has shape {tuple(saved[name].shape)}, config expects {shape}")
    item = {"params": {k: np.zeros((), saved[k].dtype) for k in names}}
    args = {"params": {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in names}}
    try:
        with ocp.PyTreeCheckpointer() as reader:
            out = reader.restore(
                ckpt / STATE, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
            )
    except Exception as e:
        raise _orbax_error(ckpt / STATE, e) from None
    return out["params"]


# ---- the earlier format (read only) ----------------------------------------------------------------------
def _open_legacy(ckpt: Path):
    from safetensors import safe_open

    path = ckpt / LEGACY_STATE
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint: {e}") from None


def _legacy_tensor(f, path: Path, name: str, shape) -> np.ndarray:
    if name not in set(f.keys()):
        raise CheckpointError(f"{path}: tensor {name} missing (was the model or optimizer changed?)")
    try:
        arr = f.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"{path}: tensor {name} unreadable: {e}") from None
    if tuple(arr.shape) != tuple(shape):
        raise CheckpointError(f"{path}: {name} has shape {arr.shape}, the run expects {tuple(shape)}")
    return arr


def _load_legacy(ckpt: Path, template, shardings):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    sh_leaves = jax.tree_util.tree_leaves(shardings) if shardings is not None else [None] * len(leaves)
    out = []
    with _open_legacy(ckpt) as f:
        for (p, leaf), sh in zip(leaves, sh_leaves):
            arr = _legacy_tensor(f, ckpt / LEGACY_STATE, jax.tree_util.keystr(p), leaf.shape).astype(leaf.dtype)
            out.append(jax.device_put(arr, sh) if sh is not None else jax.device_put(arr))
    return jax.tree_util.tree_unflatten(treedef, out)


def _legacy_params(ckpt: Path, names: dict[str, tuple]) -> dict[str, np.ndarray]:
    with _open_legacy(ckpt) as f:
        return {n: _legacy_tensor(f, ckpt / LEGACY_STATE, f".params['{n}']", s) for n, s in names.items()}


# ---- resuming --------------------------------------------------------------------------------------------
def restore_latest(
    run_dir: str | os.PathLike,
    template,
    shardings=None,
    strict: bool = False,
    say: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
):
    """(state, meta, folder) of the newest intact checkpoint, or None when there is none at all.

    A damaged newest checkpoint is reported through `say` and the next older one is tried;
    strict=True raises instead (CheckpointError), as does the case where every one is damaged.
    """
    found = checkpoints(run_dir)
    problems = []
    for _, path in reversed(found):
        try:
            state, meta = load_checkpoint(path, template, shardings)
        except CheckpointError as e:
            if strict:
                raise CheckpointError(f"{e} (--strict-resume: not falling back to an older checkpoint)") from None
            problems.append(str(e))
            say(f"--resume: skipping a damaged checkpoint: {e}")
            continue
        return state, meta, path
    if problems:
        raise CheckpointError(f"no intact checkpoint in {Path(run_dir) / CKPT_DIR}: newest problem: {problems[0]}")
    return None

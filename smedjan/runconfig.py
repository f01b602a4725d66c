"""One run configuration for every job: CLI flags, recipe JSON and the Python API fill the same object.

    RunConfig
      model      ModelSpec        preset / config.json + overrides of config.json fields
      data       DataConfig       prepared dataset + tokenizer, or a raw corpus to build them from
      optim      OptimConfig      AdamW
      schedule   ScheduleConfig   learning-rate schedule (its length is the run's `steps`)
      compute    ComputeConfig    precision, remat, attention kernel, loss chunk
      ckpt       CheckpointConfig save interval, keep, resume, export
      mesh       MeshConfig       device mesh, multi-host
      log        LogConfig        logging, validation, MFU, samples
      objective  an objective's dataclass (`LMObjective` for pre-training; fine-tuning objectives
                 register their own with `register_objective`)
      steps, batch_size, seq_len, grad_accum, seed, out

Every field has one flat name (its CLI flag without dashes, e.g. `lr`, `warmup_steps`, `schedule`)
besides its dotted path (`optim.lr`, `schedule.warmup_steps`, `schedule.kind`). A recipe may use
either: `{"lr": 2e-3}` or `{"optim": {"lr": 2e-3}}`. The CLI's flags are generated from the same
fields (`add_arguments`), so a flag, a recipe key and a dataclass field cannot drift apart.

`validate()` checks every value once and names the field: `optim.lr (--lr): must be > 0, got -1.0`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from smedjan.errors import UserError


class RunConfigError(UserError):
    """A run option with a bad value or type; the message starts with the field's path."""


# ---- field declarations --------------------------------------------------------------------------------
def opt(default: Any, help: str = "", *, check: str | None = None, choices: tuple | None = None, **meta: Any) -> Any:
    """A config field with its CLI help and its check.

    check: "positive" (> 0), "nonneg" (>= 0), "unit" (0 <= x <= 1), "open_unit" (0 <= x < 1).
    meta: flag= (CLI flag if not --<flat>), flat= (flat name if not the field name),
    negate=True (a bool default-True field whose flag is --no-<flat>), nargs=, group= (CLI help group).
    """
    kw = {"default_factory": default} if default in (dict, list) else {"default": default}
    return field(metadata={"help": help, "check": check, "choices": choices, **meta}, **kw)


@dataclass(frozen=True)
class ModelSpec:
    size: str = opt("small", "preset (tiny, small, medium, 125m, ...) or a config.json / HF folder")
    # config.json field names (hidden_size, num_hidden_layers, ...); the CLI's --dim/--layers/... fill them
    overrides: dict = opt(dict, "config.json fields to override", flat="model_overrides")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = opt("", "prepared dataset folder (smedjan prepare)")
    tokenizer: str = opt("", "tokenizer folder; must be the one the dataset was prepared with")
    corpus: tuple[str, ...] | None = opt(
        None, "'bundled' (packaged Shakespeare) or text files: train tokenizer + prepare into --out first", nargs="+"
    )
    tokenizer_vocab: int = opt(4096, "with --corpus: BPE vocab size", check="positive")
    val_fraction: float = opt(0.05, "with --corpus: held-out share of documents", check="open_unit")
    text_field: str = opt("text", "with --corpus: JSONL field holding the text")
    split: str = opt(
        "auto",
        "with --corpus: document boundaries in .txt files (see smedjan prepare)",
        choices=("auto", "line", "blank", "file"),
    )
    stream: bool = opt(False, "read tokens through np.memmap")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with decoupled weight decay (masked off norms, biases and embeddings)."""

    lr: float = opt(3e-4, "peak learning rate", check="positive")
    weight_decay: float = opt(0.1, check="nonneg")
    b1: float = opt(0.9, check="open_unit")
    b2: float = opt(0.95, check="open_unit")
    eps: float = opt(1e-8, check="positive")
    clip_norm: float = opt(1.0, "global-norm gradient clipping (0 = off)", check="nonneg")


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = opt("cosine", "learning-rate schedule", flat="schedule", choices=("cosine", "wsd", "constant"))
    warmup_steps: int = opt(100, check="nonneg")
    min_lr_ratio: float = opt(0.1, "final lr = lr x min_lr_ratio", check="unit")
    decay_fraction: float = opt(0.2, "wsd: share of steps spent decaying", check="unit")


@dataclass(frozen=True)
class ComputeConfig:
    precision: str = opt(
        "auto",
        "bf16 compute over fp32 master weights, or fp32 (auto: bf16 on accelerators, fp32 on CPU)",
        choices=("auto", "bf16", "fp32"),
    )
    remat: str = opt("auto", "auto: measured best per backend", choices=("auto", "none", "full", "dots"))
    attn_impl: str = opt("auto", choices=("auto", "xla", "cudnn", "pallas"))
    loss_chunk: int | None = opt(
        None, "tokens per chunk of the fused cross-entropy (default: measured best per backend)", check="positive"
    )


@dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = opt(500, "steps between checkpoints (0: only at the end)", check="nonneg")
    keep: int = opt(3, "checkpoints to keep", check="positive")
    resume: bool = opt(False, "continue from the newest checkpoint in --out")
    strict_resume: bool = opt(
        False, "with --resume: stop when the newest checkpoint is damaged instead of falling back to an older one"
    )
    stop_after: int | None = opt(None, "stop (with a checkpoint) after this many steps", check="positive")
    device_copy: bool = opt(
        False,
        "copy the state on the devices before saving, so training goes on at once (needs room for a second state)",
        flat="ckpt_device_copy",
    )
    max_bad_steps: int = opt(
        10,
        "a step with a non-finite loss or grad norm is skipped; stop after this many in a row (0: never)",
        check="nonneg",
    )
    export: bool = opt(True, "skip writing RUN/hf at the end", negate=True)  # help: what the --no- flag does


@dataclass(frozen=True)
class MeshConfig:
    shape: str | None = opt(None, "e.g. data=2,fsdp=4 (default: all devices on data)", flat="mesh")
    distributed: bool = opt(False, "multi-host: jax.distributed.initialize() (see smedjan.sharding)")


@dataclass(frozen=True)
class LogConfig:
    log_every: int = opt(10, check="positive")
    eval_every: int = opt(200, "steps between validations (0: only at the end)", check="nonneg")
    eval_batches: int = opt(20, check="nonneg")
    early_stopping_patience: int = opt(
        0, "stop after this many validations without a better val loss, exporting the best (0: off)", check="nonneg"
    )
    progress: bool = opt(True, "no progress bar", negate=True)
    peak_flops: float | None = opt(None, "total peak FLOP/s for MFU on unknown hardware", check="positive")
    samples: int = opt(0, "print this many sampled texts at the end", check="nonneg")
    sample_tokens: int = opt(120, check="positive")
    sample_prompt: str = opt("")


# ---- objectives ----------------------------------------------------------------------------------------
OBJECTIVES: dict[str, type] = {}


def register_objective(cls: type) -> type:
    """Class decorator: a frozen dataclass with a `name` ClassVar becomes a valid `objective`.

    Its fields are checked like every other section's (`opt(..., check=...)`) under
    `objective.<field>`, and a recipe selects it with {"objective": {"name": ..., ...}}.
    """
    OBJECTIVES[cls.name] = cls
    return cls


@register_objective
@dataclass(frozen=True)
class LMObjective:
    """Next-token cross-entropy on every position: pre-training."""

    name: ClassVar[str] = "lm"


# ---- the run -------------------------------------------------------------------------------------------
SECTIONS = ("model", "data", "optim", "schedule", "compute", "ckpt", "mesh", "log")


@dataclass(frozen=True)
class RunConfig:
    steps: int = opt(1000, "optimizer steps (the schedule's length)", check="positive")
    batch_size: int = opt(16, "global batch (sequences per optimizer step)", check="positive")
    seq_len: int = opt(256, check="positive")
    grad_accum: int = opt(1, "micro-batches per step", check="positive")
    seed: int = opt(0)
    out: str = opt("runs/run", "run folder (checkpoints, log.jsonl, hf/)", group="run")

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    log: LogConfig = field(default_factory=LogConfig)
    objective: Any = field(default_factory=LMObjective)

    def validate(self) -> RunConfig:
        """Check every field's type and range; raise RunConfigError naming the first bad one."""
        if type(self.objective) not in OBJECTIVES.values():
            raise RunConfigError(f"objective: not a registered objective ({type(self.objective).__name__})")
        objective = [
            (f"objective.{f.name}", f, getattr(self.objective, f.name), _hints(type(self.objective))[f.name])
            for f in dataclasses.fields(self.objective)
        ]
        for path, f, value, tp in [*_walk(self), *objective]:
            _coerce(path, tp, value)  # the Python API builds the dataclasses directly: check the types too
            _check(path, f, value)
        if self.batch_size % self.grad_accum:
            raise RunConfigError(
                f"batch_size (--batch-size): {self.batch_size} must divide by grad_accum (--grad-accum) {self.grad_accum}"
            )
        return self

    def to_dict(self) -> dict:
        """Nested plain dict (JSON-ready); `from_dict` reads it back."""
        d = dataclasses.asdict(self)
        d["objective"] = {"name": self.objective.name, **dataclasses.asdict(self.objective)}
        return d

    def merge(self, updates: dict, source: str = "") -> RunConfig:
        """A new, validated RunConfig: these updates (flat and/or nested keys) over this one."""
        return from_dict(updates, base=self, source=source)


# ---- building ------------------------------------------------------------------------------------------
MODEL_FLAGS = {  # CLI/recipe shorthands for config.json fields (smedjan.info.add_model_args)
    "dim": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "ffn_dim": "intermediate_size",
    "vocab_size": "vocab_size",
    "max_seq_len": "max_position_embeddings",
}


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _walk(rc: RunConfig):
    """(dotted path, dataclass field, value, type) of every leaf option of the run (objective excluded)."""
    for f in dataclasses.fields(rc):
        if f.name in SECTIONS:
            section = getattr(rc, f.name)
            for g in dataclasses.fields(section):
                yield f"{f.name}.{g.name}", g, getattr(section, g.name), _hints(type(section))[g.name]
        elif f.name != "objective":
            yield f.name, f, getattr(rc, f.name), _hints(RunConfig)[f.name]


def flat_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flat", f.name)


def flag_of(f: dataclasses.Field) -> str:
    name = flat_name(f).replace("_", "-")
    return f.metadata.get("flag") or (f"--no-{name}" if f.metadata.get("negate") else f"--{name}")


def _flat_index() -> dict[str, tuple[str | None, str]]:
    """flat name -> (section or None for top level, field name)."""
    index = {}
    for path, f, _, _ in _walk(RunConfig()):
        section, _, name = path.rpartition(".")
        index[flat_name(f)] = (section or None, name)
    return index


FLAT = _flat_index()
LABELS = {path: f"{path} ({flag_of(f)})" for path, f, _, _ in _walk(RunConfig())}


def _label(path: str) -> str:
    """`optim.lr (--lr)`: the dotted path and the flag that sets it."""
    return LABELS.get(path, path)


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """`value` as type `tp` (int, float, bool, str, dict, tuple[str, ...], X | None), or RunConfigError."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        args = typing.get_args(tp)
    kind = typing.get_origin(tp) or tp
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    if kind is dict and isinstance(value, dict):
        return dict(value)
    if kind is tuple and isinstance(value, (str, list, tuple)):
        items = [value] if isinstance(value, str) else list(value)
        if all(isinstance(i, str) for i in items):
            return tuple(items)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object"}
    want = names.get(kind, "a list of strings")
    raise RunConfigError(f"{_label(path)}: expected {want}, got {value!r}")


def _check(path: str, f: dataclasses.Field, value: Any) -> None:
    check, choices = f.metadata.get("check"), f.metadata.get("choices")
    if value is None:
        return
    if choices and value not in choices:
        raise RunConfigError(f"{_label(path)}: must be one of {', '.join(choices)}, got {value!r}")
    bad = {
        "positive": ("must be > 0", lambda v: v > 0),
        "nonneg": ("must be >= 0", lambda v: v >= 0),
        "unit": ("must be in [0, 1]", lambda v: 0 <= v <= 1),
        "open_unit": ("must be in [0, 1)", lambda v: 0 <= v < 1),
    }.get(check)
    if bad and not bad[1](value):
        raise RunConfigError(f"{_label(path)}: {bad[0]}, got {value!r}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RunConfigError(f"{prefix}{unknown[0]}: unknown option (known: {', '.join(sorted(names))})")
    return cls(**{k: _coerce(prefix + k, hints[k], v) for k, v in values.items()})


def _objective(spec: Any) -> Any:
    if dataclasses.is_dataclass(spec):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or spec.get("name") not in OBJECTIVES:
        raise RunConfigError(f"objective: expected one of {', '.join(OBJECTIVES)} (as {{'name': ...}}), got {spec!r}")
    rest = {k: v for k, v in spec.items() if k != "name"}
    return _build(OBJECTIVES[spec["name"]], rest, "objective.")


def from_dict(updates: dict, base: RunConfig | None = None, source: str = "") -> RunConfig:
    """A validated RunConfig: `updates` over `base` (default: the defaults).

    Keys may be flat (`lr`, `warmup_steps`, `dim`, ...), nested sections (`{"optim": {"lr": ...}}`)
    or dotted (`"optim.lr"`); keys starting with `_` are comments. Values of None mean "not given".
    """
    where = f"{source}: " if source else ""
    base = base or RunConfig()
    nested = {s: dataclasses.asdict(getattr(base, s)) for s in SECTIONS}
    top = {f.name: getattr(base, f.name) for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS}
    shorthands = {}
    try:
        for key, value in updates.items():
            key = key.replace("-", "_")
            if key.startswith("_") or value is None:
                continue
            if key in SECTIONS and (isinstance(value, dict) or key not in FLAT):  # flat `schedule`, `mesh`: strings
                if not isinstance(value, dict):
                    raise RunConfigError(f"{key}: expected an object of options, got {value!r}")
                for k, v in value.items():
                    if v is not None:
                        nested[key][k.replace("-", "_")] = v
            elif "." in key and key.split(".", 1)[0] in SECTIONS:
                section, name = key.split(".", 1)
                nested[section][name] = value
            elif key in MODEL_FLAGS:
                shorthands[key] = value
            elif key == "objective":
                top["objective"] = _objective(value)
            elif key in FLAT:
                section, name = FLAT[key]
                if section is None:
                    top[name] = value
                elif key == "model_overrides":  # merged, so a flag can override one field of a recipe's dict
                    if not isinstance(value, dict):
                        raise RunConfigError(f"model.overrides: expected an object, got {value!r}")
                    nested["model"]["overrides"] = {**nested["model"]["overrides"], **value}
                else:
                    nested[section][name] = value
            else:
                raise RunConfigError(f"{key}: unknown option")
        if shorthands:
            nested["model"]["overrides"] = {**nested["model"]["overrides"], **model_overrides(shorthands)}
        sections = {s: _build(type(getattr(base, s)), nested[s], f"{s}.") for s in SECTIONS}
        hints = _hints(RunConfig)
        scalars = {k: v if k == "objective" else _coerce(k, hints[k], v) for k, v in top.items()}
        return RunConfig(**sections, **scalars).validate()
    except RunConfigError as e:
        raise RunConfigError(f"{where}{e}") from None


def model_overrides(shorthands: dict) -> dict:
    """config.json overrides from the --dim/--layers/... shorthands (None = not given)."""
    out = {}
    for flag, hf in MODEL_FLAGS.items():
        value = shorthands.get(flag)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise RunConfigError(
                f"model.overrides.{hf} (--{flag.replace('_', '-')}): must be an integer > 0, got {value!r}"
            )
        out[hf] = value
    if "num_attention_heads" in out and "num_key_value_heads" not in out:
        out["num_key_value_heads"] = out["num_attention_heads"]  # --heads alone means plain multi-head
    if "hidden_size" in out or "num_attention_heads" in out:
        out["head_dim"] = 0  # re-derive from the new shape
    return out


def load_recipe(path: str | Path) -> dict:
    """A recipe file's options (flat or nested keys), checked to be a JSON object."""
    p = Path(path)
    if not p.is_file():
        raise RunConfigError(f"--recipe {path}: no such file")
    try:
        recipe = json.loads(p.read_text())
    except ValueError as e:  # JSON or UTF-8
        raise RunConfigError(f"--recipe {path}: not valid JSON ({e})") from None
    if not isinstance(recipe, dict):
        raise RunConfigError(f"--recipe {path}: expected a JSON object")
    return recipe


# ---- the command line ----------------------------------------------------------------------------------
GROUPS = {  # CLI help groups: section -> group title (top-level scalars go to "optimisation")
    "data": "data",
    "model": "model",
    "optim": "optimisation",
    "schedule": "optimisation",
    "compute": "optimisation",
    "ckpt": "run",
    "mesh": "run",
    "log": "run",
}


def add_arguments(
    parser: argparse.ArgumentParser, model_args: Callable[[Any], None], skip: tuple[str, ...] = ()
) -> None:
    """One flag per field (default None = not given, so a recipe's value survives); `model_args(group)`
    adds the --dim/--layers/... shorthands; sections in `skip` get no flags (fine-tuning has no `data`)."""
    groups = {}

    def group(title: str) -> Any:
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        return groups[title]

    defaults = RunConfig()
    for path, f, default, tp in _walk(defaults):
        section = path.split(".")[0] if "." in path else None
        if section in skip:
            continue
        if path == "model.overrides":
            model_args(group("model"))
            continue
        g = group(f.metadata.get("group") or GROUPS.get(section, "optimisation"))
        help_ = f.metadata.get("help", "")
        if default not in (None, "", False, True):
            help_ = f"{help_} (default: {default})".strip()
        kw = {"dest": flat_name(f), "default": None, "help": help_ or None}
        if tp is bool:
            kw["action"] = "store_false" if f.metadata.get("negate") else "store_true"
        else:
            base = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if base[0] in (int, float):
                kw["type"] = base[0]
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            if f.metadata.get("nargs"):
                kw["nargs"] = f.metadata["nargs"]
        g.add_argument(flag_of(f), **kw)


def from_args(args: argparse.Namespace) -> RunConfig:
    """RunConfig from parsed flags over the `--recipe` file over the defaults."""
    recipe = load_recipe(args.recipe) if getattr(args, "recipe", None) else {}
    rc = from_dict(recipe, source=f"--recipe {args.recipe}") if recipe else RunConfig()
    given = {k: v for k, v in vars(args).items() if k in FLAT or k in MODEL_FLAGS}
    return rc.merge(given)

"""Bad input of every kind ends in one clear line: damaged model folders (generated here from a tiny
model saved by save_hf) through every command that loads one, and every subcommand, found from
`build_parser()`, walked with missing, garbage and empty inputs. No traceback, exit status 1."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_generate import make_tiny_checkpoint

from smedjan.checkpoint import CheckpointError, load_hf, save_hf
from smedjan.cli import build_parser, main

ST = "model.safetensors"
NORM = "model.norm.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "tiny"
    make_tiny_checkpoint(folder)
    return folder


# ---- damage: each takes a copy of the good folder and breaks one thing ---------------------------------
def _json(folder, name, fn):
    p = folder / name
    p.write_text(json.dumps(fn(json.loads(p.read_text()))))


def _config(**changes):
    return lambda f: _json(f, "config.json", lambda d: {**d, **changes})


def _drop_config(key):
    return lambda f: _json(f, "config.json", lambda d: {k: v for k, v in d.items() if k != key})


def _tensors(fn):
    def damage(f):
        t = load_file(f / ST)
        fn(t)
        save_file(t, str(f / ST), metadata={"format": "pt"})

    return damage


def _write(name, data: bytes | str):
    return lambda f: (f / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def _remove(name):
    return lambda f: (f / name).unlink()


def _raw(fn):
    """Edit the safetensors bytes (header edits keep the header's length)."""
    return lambda f: (f / ST).write_bytes(fn((f / ST).read_bytes()))


def _index(weight_map_fn):
    def damage(f):
        names = list(load_file(f / ST))
        index = {"metadata": {}, "weight_map": weight_map_fn({n: ST for n in names})}
        (f / "model.safetensors.index.json").write_text(json.dumps(index))

    return damage


def _retype_header(raw: bytes, name: str, old: bytes, new: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n]
    at = header.index(json.dumps(name).encode())
    end = header.index(b"}", at)
    entry = header[at:end].replace(old, new, 1)
    return raw[:8] + header[:at] + entry + header[end:] + raw[8 + n :]


def _template(source):
    return lambda f: _json(f, "tokenizer_config.json", lambda d: {**d, "chat_template": source})


# (id, damage, text the one-line error must contain)
DAMAGE = [
    ("config-missing", _remove("config.json"), "no config.json"),
    ("config-not-json", _write("config.json", "{model_type: llama"), "config.json: not valid JSON"),
    ("config-binary", _write("config.json", b"\xff\xfe\x00garbage"), "config.json"),
    ("config-list", _write("config.json", "[1, 2]"), "config.json: expected a JSON object"),
    ("config-model-type", _config(model_type="gpt_neox"), "gpt_neox"),
    ("config-rope-abc", _config(rope_parameters="abc"), "rope_parameters"),
    ("config-rope-theta", _config(rope_parameters={"rope_type": "default", "rope_theta": "x"}), "rope_theta"),
    ("config-rope-no-factor", _config(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "factor"),
    ("config-rope-type", _config(rope_parameters={"rope_type": "warp", "rope_theta": 1e4}), "warp"),
    ("config-eps-negative", _config(rms_norm_eps=-1), "rms_norm_eps"),
    ("config-eps-string", _config(rms_norm_eps="small"), "rms_norm_eps"),
    ("config-positions-huge", _config(max_position_embeddings=10**12), "max_position_embeddings"),
    ("config-positions-float", _config(max_position_embeddings=1e12), "max_position_embeddings"),
    ("config-hidden-string", _config(hidden_size="64"), "hidden_size"),
    ("config-vocab-negative", _config(vocab_size=-5), "vocab_size"),
    ("config-heads-zero", _config(num_attention_heads=0), "num_attention_heads"),
    ("config-kv-heads", _config(num_key_value_heads=3), "num_key_value_heads"),
    ("config-layers-bool", _config(num_hidden_layers=True), "num_hidden_layers"),
    ("config-tie-string", _config(tie_word_embeddings="yes"), "tie_word_embeddings"),
    ("config-eos-string", _config(eos_token_id="</s>"), "eos_token_id"),
    ("config-unknown-field", _config(num_experts_wizard=3), "num_experts_wizard"),
    ("config-quantized", _config(quantization_config={"bits": 4}), "quantization_config"),
    ("config-act", _config(hidden_act="gelu"), "hidden_act"),
    ("config-shape-mismatch", _config(intermediate_size=100), "shape"),
    ("weights-missing", _remove(ST), "no *.safetensors"),
    ("weights-truncated", _raw(lambda b: b[: len(b) // 2]), ST),
    ("weights-empty", _write(ST, b""), ST),
    ("weights-garbage", _write(ST, os.urandom(4096)), ST),
    ("weights-header-dtype", _raw(lambda b: _retype_header(b, NORM, b"F32", b"F16")), f"tensor '{NORM}'"),
    ("weights-header-shape", _raw(lambda b: _retype_header(b, NORM, b"[64]", b"[32]")), f"tensor '{NORM}'"),
    ("weights-int32", _tensors(lambda t: t.update({NORM: t[NORM].astype(np.int32)})), "stored as I32"),
    ("weights-bool", _tensors(lambda t: t.update({NORM: t[NORM] > 0})), "stored as BOOL"),
    ("weights-int8", _tensors(lambda t: t.update({UP1: t[UP1].astype(np.int8)})), "stored as I8"),
    ("weights-nan", _tensors(lambda t: t[UP1].__setitem__((3, 5), np.nan)), f"'{UP1}' holds NaN or Inf"),
    ("weights-inf", _tensors(lambda t: t[NORM].__setitem__(0, -np.inf)), f"'{NORM}' holds NaN or Inf"),
    ("weights-tensor-missing", _tensors(lambda t: t.pop(UP1)), f"'{UP1}' missing"),
    ("weights-tensor-shape", _tensors(lambda t: t.update({NORM: t[NORM][:10]})), "shape (10,)"),
    ("weights-tensor-extra", _tensors(lambda t: t.update({"model.extra.weight": t[NORM]})), "does not account"),
    ("index-not-json", _write("model.safetensors.index.json", "{oops"), "malformed index"),
    ("index-list", _write("model.safetensors.index.json", "[]"), "malformed index"),
    ("index-no-map", _write("model.safetensors.index.json", "{}"), "malformed index"),
    ("index-map-list", _write("model.safetensors.index.json", '{"weight_map": ["a"]}'), "weight_map"),
    ("index-map-ints", _index(lambda m: {k: 1 for k in m}), "weight_map"),
    ("index-parent", _index(lambda m: {**m, NORM: "../outside/x.safetensors"}), "inside the model folder"),
    ("index-passwd", _index(lambda m: {**m, NORM: "../../../../etc/passwd"}), "inside the model folder"),
    ("index-absolute", _index(lambda m: {**m, NORM: "/etc/passwd"}), "inside the model folder"),
    ("index-backslash", _index(lambda m: {**m, NORM: "..\\..\\x.safetensors"}), "inside the model folder"),
    ("index-missing-shard", _index(lambda m: {**m, NORM: "model-2.safetensors"}), "file missing"),
    ("tokenizer-missing", _remove("tokenizer.json"), "no tokenizer.json"),
    ("tokenizer-garbage", _write("tokenizer.json", "not a tokenizer"), "tokenizer.json"),
    ("tokenizer-empty", _write("tokenizer.json", ""), "tokenizer.json"),
    ("tokenizer-config-garbage", _write("tokenizer_config.json", "{bos"), "tokenizer_config.json: not valid JSON"),
    ("tokenizer-config-list", _write("tokenizer_config.json", "[]"), "tokenizer_config.json: expected a JSON"),
    ("tokenizer-config-eos", lambda f: _json(f, "tokenizer_config.json", lambda d: {**d, "eos_token": 5}), "eos"),
    ("template-not-string", _template(42), "expected a template string"),
]
# Broken chat templates load fine and fail when used: with --chat, or in `smedjan chat`.
TEMPLATE_DAMAGE = [
    ("template-syntax", _template("{% for m in messages %}{{ m.content }}"), "chat template failed"),
    ("template-sandbox", _template("{{ messages.append(1) }}{{ ''.__class__.__mro__ }}"), "chat template failed"),
    ("template-raises", _template("{{ raise_exception('no system prompts here') }}"), "no system prompts here"),
    ("template-undefined", _template("{{ nothing.at.all }}"), "chat template failed"),
]


def _damaged(good, tmp_path, damage):
    folder = tmp_path / "model"
    shutil.copytree(good, folder)
    damage(folder)
    return folder


def _run(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(argv)
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, command: str, *fragments: str):
    lines = err.strip().splitlines()
    assert rc == 1 and "Traceback" not in err, (rc, err)
    assert len(lines) == 1 and lines[0].startswith(f"smedjan {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("case", DAMAGE + TEMPLATE_DAMAGE, ids=[c[0] for c in DAMAGE + TEMPLATE_DAMAGE])
def test_damaged_model_folder_is_one_line(good, tmp_path, capsys, case):
    name, damage, expected = case
    folder = _damaged(good, tmp_path, damage)
    argv = ["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2"]
    if name.startswith("template"):
        argv.append("--chat")
    rc, err = _run(capsys, argv)
    assert_one_line_error(rc, err, "generate", expected)
    if name.startswith(("config", "weights", "index", "tokenizer")) and not name.endswith("missing"):
        assert str(folder) in err  # names the file


SERVE_CASES = ["config-list", "weights-nan", "index-parent", "tokenizer-garbage", "tokenizer-config-garbage"]


@pytest.mark.parametrize("command", ["serve", "chat", "info"])
def test_damaged_folder_other_commands(good, tmp_path, capsys, monkeypatch, command):
    """serve and chat load through the same path as generate; info reads the config alone."""
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    cases = [c for c in DAMAGE if c[0] in SERVE_CASES or (command == "info" and c[0].startswith("config-r"))]
    for name, damage, expected in cases:
        if command == "info" and not name.startswith("config"):
            continue
        folder = _damaged(good, tmp_path / name, damage)
        extra = ["--port", "0", "--no-warmup"] if command == "serve" else []
        rc, err = _run(capsys, [command, str(folder), *extra])
        assert_one_line_error(rc, err, command, expected)


@pytest.mark.parametrize("case", TEMPLATE_DAMAGE[:3], ids=[c[0] for c in TEMPLATE_DAMAGE[:3]])
def test_broken_template_in_chat(good, tmp_path, capsys, monkeypatch, case):
    name, damage, expected = case
    folder = _damaged(good, tmp_path, damage)
    monkeypatch.setattr(sys, "stdin", open(_text_file(tmp_path / "in.txt", "hello\n")))
    rc, err = _run(capsys, ["chat", str(folder), "--max-new-tokens", "2"])
    assert_one_line_error(rc, err, "chat", expected, "tokenizer_config.json")


def test_serve_refuses_a_template_that_does_not_parse(good, tmp_path, capsys):
    folder = _damaged(good, tmp_path, TEMPLATE_DAMAGE[0][1])
    rc, err = _run(capsys, ["serve", str(folder), "--port", "0", "--no-warmup"])
    assert_one_line_error(rc, err, "serve", "TemplateSyntaxError", "tokenizer_config.json")


def _text_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_subprocess_stderr_is_one_line(good, tmp_path):
    """The real process: nothing else (warnings, logging) reaches stderr before the error."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for name, damage, expected in [c for c in DAMAGE if c[0] in ("config-list", "weights-nan")]:
        folder = _damaged(good, tmp_path / name, damage)
        cmd = [sys.executable, "-m", "smedjan", "generate", str(folder), "--prompt", "hi"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert_one_line_error(proc.returncode, proc.stderr, "generate", expected)


def _fake_run(root: Path, meta: str | None, state: bytes | None) -> Path:
    ckpt = root / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(meta)
    (ckpt / "state.safetensors").write_bytes(state)
    return root


def _tiny_meta() -> str:
    from smedjan.config import ModelConfig

    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return json.dumps({"step": 10, "model_config": cfg.to_hf_dict()})


def _one_tensor_state() -> bytes:
    from safetensors.numpy import save

    return save({".step": np.zeros((), np.int32)})


RUN_DAMAGE = [
    ("meta-garbage", lambda: "{not json", _one_tensor_state),
    ("meta-list", lambda: "[]", _one_tensor_state),
    ("meta-no-config", lambda: '{"step": 10}', _one_tensor_state),
    ("meta-config-list", lambda: '{"step": 10, "model_config": [1]}', _one_tensor_state),
    ("state-garbage", _tiny_meta, lambda: os.urandom(1000)),
    ("state-truncated", _tiny_meta, lambda: _one_tensor_state()[:-3]),
    ("state-tensor-missing", _tiny_meta, _one_tensor_state),
]


@pytest.mark.parametrize("case", RUN_DAMAGE, ids=[c[0] for c in RUN_DAMAGE])
def test_export_hf_damaged_run_is_one_line(tmp_path, capsys, case):
    name, meta, state = case
    run = _fake_run(tmp_path / "run", meta(), state())
    rc, err = _run(capsys, ["export-hf", str(run), "--output", str(tmp_path / "hf")])
    assert_one_line_error(rc, err, "export-hf", str(run))
    assert not (tmp_path / "hf").exists()


# ---- the loaders directly: containment, HF cache symlinks, dtype warnings ------------------------------
def test_hf_cache_snapshot_symlinks_load(good, tmp_path):
    """A hub cache snapshot is symlinks into ../../blobs: followed, since the index's names stay inside."""
    import jax.numpy as jnp

    cfg_ref, params_ref = load_hf(good)
    sharded = tmp_path / "sharded"
    save_hf(sharded, cfg_ref, params_ref, tokenizer_dir=good, dtype=jnp.float32, max_shard_bytes=40_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(sharded.iterdir())):
        blob = repo / "blobs" / f"{i:064x}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    cfg, params = load_hf(snapshot)
    assert cfg == cfg_ref
    assert all(np.array_equal(np.asarray(params[k]), np.asarray(params_ref[k])) for k in params_ref)
    # ...but a name in the index that leaves the snapshot is refused, even into the same cache
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    target = (snapshot / index["weight_map"][NORM]).resolve().name
    index["weight_map"][NORM] = f"../../blobs/{target}"
    (snapshot / "model.safetensors.index.json").unlink()
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'\.\./\.\./blobs/.*' is not a file name inside the model folder"):
        load_hf(snapshot)


def test_float64_weights_load_with_a_warning(good, tmp_path):
    folder = _damaged(good, tmp_path, _tensors(lambda t: t.update({NORM: t[NORM].astype(np.float64)})))
    with pytest.warns(UserWarning, match=f"1 tensors stored as float64 \\(e.g. '{NORM}'\\) were converted"):
        _, params = load_hf(folder)
    assert params[NORM].dtype == np.float32


def test_same_size_header_dtype_edit_is_warned(good, tmp_path):
    """BF16 -> F16 in the header keeps the byte size, so the file reads; the odd dtype is the trace."""
    import ml_dtypes

    def damage(f):
        _tensors(lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}))(f)
        _raw(lambda b: _retype_header(b, NORM, b'BF16"', b'F16" '))(f)

    folder = _damaged(good, tmp_path, damage)
    with pytest.warns(UserWarning, match=f"mixed dtypes .*e.g. '{NORM}' is F16"):
        load_hf(folder)


def test_overflow_on_conversion_is_named(good, tmp_path):
    import jax.numpy as jnp

    folder = _damaged(good, tmp_path, _tensors(lambda t: t[NORM].__setitem__(0, 1e6)))
    with pytest.raises(CheckpointError, match=f"'{NORM}' holds NaN or Inf values after conversion to float16"):
        load_hf(folder, dtype=jnp.float16)


# ---- every subcommand, with missing / garbage / empty inputs --------------------------------------------
PATHISH = ("model", "folder", "path", "dir", "file", "input", "dataset", "tokenizer", "recipe", "size", "corpus")
OUTPUTS = ("output", "out")


def _is_subparsers(action) -> bool:
    return action.__class__.__name__ == "_SubParsersAction"


def _leaf_commands(parser, prefix=()):
    """(argv prefix, parser) of every runnable command, nested ones (`convert gguf`) included."""
    for action in parser._actions:
        if _is_subparsers(action):
            for name, sub in action.choices.items():
                yield from _leaf_commands(sub, (*prefix, name))
            return
    if prefix:
        yield prefix, parser


def _bad_argv(sub, bad: str, out: Path) -> list[str] | None:
    """argv that passes argparse with `bad` in every input slot, or None when the command takes none."""
    positionals, options, filled = [], [], False
    for a in sub._actions:
        if a.option_strings and (a.nargs == 0 or a.dest == "help"):
            continue
        is_output = a.dest in OUTPUTS
        wanted = not a.option_strings or a.required or any(p in a.dest for p in PATHISH) or is_output
        if not wanted:
            continue
        if a.choices is not None:
            value = str(next(iter(a.choices)))  # a required choice: any valid one
        elif a.type not in (None, str):
            if a.required or not a.option_strings:
                return None  # a required non-path value this walker cannot invent
            continue
        else:
            value = str(out / f"out-{a.dest}") if is_output else bad
            filled = filled or not is_output
        if a.option_strings:
            options += [a.option_strings[-1], value]
        else:
            positionals.append(value)
    return [*positionals, *options] if filled else None


def test_every_subcommand_refuses_bad_inputs_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    monkeypatch.chdir(tmp_path)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(2048))
    empty = tmp_path / "empty"
    empty.mkdir()
    inputs = {"missing": str(tmp_path / "nope" / "x"), "garbage": str(garbage), "empty": str(empty)}
    walked = []
    for names, sub in _leaf_commands(build_parser()):
        command = names[0]
        for kind, bad in inputs.items():
            args = _bad_argv(sub, bad, tmp_path / kind)
            if args is None:
                continue
            argv = [*names, *args]
            rc, err = _run(capsys, argv)
            # 0: the input was fine for this command (a binary file is a text corpus, read leniently).
            # Progress output may come first; the error is the last line, and nothing is a traceback.
            assert rc in (0, 1) and "Traceback" not in err, (argv, rc, err)
            if rc:
                assert err.strip().splitlines()[-1].startswith(f"smedjan {command}: error: "), (argv, err)
                walked.append(command)
    # The commands that read a model, data or run folder all refused something (as will newcomers).
    assert {"generate", "serve", "chat", "info", "train", "export-hf", "prepare", "tokenizer"} <= set(walked)

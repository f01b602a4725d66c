"""Sharding: mesh parsing, partition rules, and sharded training == single-device training.

The multi-device checks run in a subprocess with 8 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax is imported).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from smedjan.sharding import ShardingError, parse_mesh_spec

ROOT = Path(__file__).resolve().parents[1]


def test_parse_mesh_spec():
    assert parse_mesh_spec(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert parse_mesh_spec("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parse_mesh_spec("fsdp=-1,tensor=2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert parse_mesh_spec({"tensor": 1}, 1) == {"data": 1, "fsdp": 1, "tensor": 1}
    for bad, msg in [
        ("data=3", "needs 3 devices"),
        ("pipe=2", "unknown axis"),
        ("data", "axis=size"),
        ("data=-1,fsdp=-1", "at most one"),
        ("data=x", "integer"),
        ("data=0", "positive"),
    ]:
        with pytest.raises(ShardingError, match=msg):
            parse_mesh_spec(bad, 8)


SCRIPT = textwrap.dedent(r"""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8, jax.devices()
    from smedjan.config import preset
    from smedjan.sharding import make_mesh, param_shardings, batch_sharding
    from smedjan.model.transformer import param_shapes
    from smedjan.runconfig import OptimConfig, ScheduleConfig
    from smedjan.train.step import make_optimizer, init_train_state, make_train_step

    cfg = preset("tiny", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=0, vocab_size=256, tie_word_embeddings=False)
    opt = make_optimizer(OptimConfig(lr=3e-3), ScheduleConfig(warmup_steps=1), total_steps=10)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, size=(8, 33)).astype(np.int32) for _ in range(3)]
    import importlib
    fa = importlib.import_module("pallas_kernels.flash_attention")  # the module (the package re-exports the function)
    kernel, seen = fa.flash_attention, []

    def spy(q, k, v, **kw):  # the shapes the Pallas kernel is traced with
        seen.append([list(q.shape), list(k.shape)])
        return kernel(q, k, v, **kw)

    fa.flash_attention = spy
    out = {}
    for name, spec, devices, accum, attn in [("single", "data=1", jax.devices()[:1], 1, "xla"),
                                             ("sharded", "data=2,fsdp=2,tensor=2", None, 2, "xla"),
                                             ("sharded_pallas", "data=2,fsdp=2,tensor=2", None, 2, "pallas")]:
        mesh = make_mesh(spec, devices)
        state = init_train_state(cfg, jax.random.key(0), opt, mesh=mesh)
        step = make_train_step(cfg, opt, compute_dtype=None, grad_accum=accum, loss_chunk=64, mesh=mesh,
                               attn_impl=attn)
        losses = []
        for b in batches:
            state, m = step(state, {"tokens": jax.device_put(b, batch_sharding(mesh))})
            losses.append(float(m["loss"]))
        out[name] = {"losses": losses,
                     "norm": float(jnp.sum(state.params["model.layers.mlp.down_proj.weight"] ** 2))}
        if name == "sharded":
            specs = {k: [list(a) if isinstance(a, tuple) else a for a in v.spec]
                     for k, v in param_shardings(param_shapes(cfg), mesh).items()}
            out["specs"] = specs
            out["state_q"] = str(state.params["model.layers.self_attn.q_proj.weight"].sharding.spec)
            mu = state.opt_state[1][0].mu["model.layers.self_attn.q_proj.weight"]
            out["mu_q"] = str(mu.sharding.spec)
            out["q_shard_shape"] = list(state.params["model.layers.self_attn.q_proj.weight"]
                                        .addressable_shards[0].data.shape)
            out["n_devices_q"] = len(state.params["model.layers.self_attn.q_proj.weight"].sharding.device_set)
    out["pallas_shapes"] = seen
    print("RESULT " + json.dumps(out))
""")


def test_sharded_training_matches_single_device(tmp_path):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    script = tmp_path / "shard_check.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT ") :])
    single, sharded = res["single"], res["sharded"]
    assert single["losses"][-1] < single["losses"][0]  # it trains
    for a, b in zip(single["losses"], sharded["losses"]):
        assert abs(a - b) < 1e-4, (single["losses"], sharded["losses"])
    assert abs(single["norm"] - sharded["norm"]) < 1e-4 * single["norm"]
    # the Pallas kernel, which GSPMD cannot split, runs per device: 4 rows per microbatch over
    # data·fsdp = 4 devices -> 1 row; 4 query / 2 kv heads over tensor = 2 -> 2 / 1
    assert res["pallas_shapes"] and all(s == [[1, 32, 2, 16], [1, 32, 1, 16]] for s in res["pallas_shapes"])
    for a, b in zip(single["losses"], res["sharded_pallas"]["losses"]):
        assert abs(a - b) < 1e-4, (single["losses"], res["sharded_pallas"]["losses"])

    specs = res["specs"]
    # stacked layer axis never split; column-parallel q/gate/up, row-parallel o/down, fsdp on the other dim
    assert specs["model.layers.self_attn.q_proj.weight"] == [None, "tensor", "fsdp"]
    assert specs["model.layers.self_attn.k_proj.weight"] == [None, "tensor", "fsdp"]
    assert specs["model.layers.mlp.gate_proj.weight"] == [None, "tensor", "fsdp"]
    assert specs["model.layers.self_attn.o_proj.weight"] == [None, "fsdp", "tensor"]
    assert specs["model.layers.mlp.down_proj.weight"] == [None, "fsdp", "tensor"]
    assert specs["model.embed_tokens.weight"] == ["tensor", "fsdp"]
    assert specs["lm_head.weight"] == ["tensor", "fsdp"]
    assert specs["model.layers.input_layernorm.weight"] == [None, None]
    assert specs["model.norm.weight"] == [None]
    # the live state is laid out that way, AdamW moments included: q_proj [2, 64, 64] -> [2, 32, 32] per device
    assert res["state_q"] == res["mu_q"]
    assert res["q_shard_shape"] == [2, 32, 32] and res["n_devices_q"] == 8


def test_cli_train_on_a_mesh_of_8_fake_devices(tmp_path):
    """`smedjan train --mesh data=2,fsdp=2,tensor=2` end to end (tokenizer, prepare, train, export)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    src = tmp_path / "c.txt"
    src.write_text("\n".join(f"line {i}: the rain in spain stays mainly in the plain" for i in range(400)))
    code = textwrap.dedent(f"""
        import sys
        from smedjan.cli import main
        sys.exit(main(["train", "--corpus", {str(src)!r}, "--tokenizer-vocab", "300", "--size", "tiny",
                       "--dim", "32", "--layers", "1", "--heads", "2", "--ffn-dim", "64", "--steps", "3",
                       "--batch-size", "8", "--seq-len", "16", "--mesh", "data=2,fsdp=2,tensor=2",
                       "--eval-batches", "1", "--no-progress", "--out", {str(tmp_path / "run")!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "'data': 2, 'fsdp': 2, 'tensor': 2" in proc.stderr
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()
    log = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
    assert log[-1]["step"] == 3 and "val_loss" in log[-1]


def test_chunked_loss_keeps_each_chunk_on_every_device():
    """Loss chunks under a batch-split mesh: each device works on its own rows of every chunk, so the
    compiled gradient has one all-reduce (the lm_head's) and gathers no activations. Contiguous
    chunks of the flattened batch made XLA all-gather the hidden states and run the whole loss on
    every device."""
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    code = textwrap.dedent("""
        import collections, json, jax, jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P
        from smedjan.sharding import make_mesh
        from smedjan.train.loss import chunked_cross_entropy
        mesh = make_mesh("data=2")
        rows = NamedSharding(mesh, P("data"))
        h = jax.device_put(jax.random.normal(jax.random.key(0), (8, 64, 32), jnp.bfloat16), rows)
        t = jax.device_put(jax.random.randint(jax.random.key(1), (8, 64), 0, 300), rows)
        w = jax.device_put(jax.random.normal(jax.random.key(2), (300, 32)), NamedSharding(mesh, P()))
        f = jax.jit(jax.grad(lambda h, w: chunked_cross_entropy(h, w, t, chunk_size=128)[0], argnums=(0, 1)))
        ops = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
        txt = f.lower(h, w).compile().as_text()
        print("RESULT " + json.dumps(collections.Counter(
            op for line in txt.splitlines() for op in ops if f" {op}(" in line or f" {op}-start(" in line)))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    assert json.loads(line[len("RESULT ") :]) == {"all-reduce": 1}


def test_distributed_flag_initializes_from_env(tmp_path):
    """--distributed: jax.distributed.initialize() from JAX_COORDINATOR_ADDRESS & co (one process here)."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAX_NUM_PROCESSES="1",
        JAX_PROCESS_ID="0",
    )
    env.pop("XLA_FLAGS", None)
    src = tmp_path / "c.txt"
    src.write_text("\n".join(f"line {i}: the rain in spain" for i in range(300)))
    code = textwrap.dedent(f"""
        import sys, jax
        from smedjan.cli import main
        rc = main(["train", "--corpus", {str(src)!r}, "--tokenizer-vocab", "300", "--size", "tiny", "--dim", "32",
                   "--layers", "1", "--heads", "2", "--ffn-dim", "64", "--steps", "2", "--batch-size", "4",
                   "--seq-len", "16", "--distributed", "--no-progress", "--eval-batches", "1",
                   "--out", {str(tmp_path / "run")!r}])
        try:  # private API: only checked where it exists
            from jax._src import distributed
            client = distributed.global_state.client
        except (ImportError, AttributeError):
            client = "unknown"
        assert client is not None, "jax.distributed was not initialised"
        sys.exit(rc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "run" / "hf" / "config.json").is_file()

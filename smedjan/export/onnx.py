"""ONNX decoder graphs with a KV cache, in the layout optimum and transformers.js use.

    smedjan export runs/main_job/hf --format onnx --out model-onnx/

writes `onnx/model.onnx` beside `config.json`, `generation_config.json` and the tokenizer files
(the folder layout transformers.js loads). The graph is built node by node from the parameter
dict with `onnx.helper`, following the same layer functions as `smedjan.model.transformer`:

    inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64,
             position_ids [batch, seq] int64, past_key_values.N.key / .value [batch, kv_heads, past, head_dim]
    outputs  logits [batch, seq, vocab], present.N.key / .value [batch, kv_heads, past + seq, head_dim]

float32 weights; opset 17 (what onnxruntime-web runs).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from smedjan.config import ModelConfig
from smedjan.errors import UserError
from smedjan.model.transformer import LAYER_PREFIX

OPSET = 17
NEG = -3.4e38  # a masked score; finite so a row with nothing to attend to never turns into NaN


class ONNXError(UserError):
    """A checkpoint that cannot be written as an ONNX graph."""


class _Graph:
    """Nodes, initializers and fresh names for one graph."""

    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, *inputs: str, hint: str | None = None, **attrs) -> str:
        from onnx import helper

        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, value, hint: str = "const", dtype=None) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, values, hint: str = "shape") -> str:
        return self.const(np.asarray(values, np.int64), hint)

    def output(self, src: str, name: str) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node("Identity", [src], [name], name=f"out_{name}"))


def _rms_norm(g: _Graph, x: str, weight: str, eps: float) -> str:
    ms = g.op("ReduceMean", g.op("Mul", x, x), axes=[-1], keepdims=1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.const(np.float32(eps), "eps"))))
    return g.op("Mul", g.op("Mul", x, inv), weight, hint="rmsnorm")


def _linear(g: _Graph, x: str, w: np.ndarray, b: np.ndarray | None, hint: str) -> str:
    """x · w^T (+ b); the weight is stored transposed, [in, out], so MatMul needs no Transpose."""
    y = g.op("MatMul", x, g.const(np.ascontiguousarray(w.T), hint + ".weight"), hint=hint)
    return y if b is None else g.op("Add", y, g.const(b, hint + ".bias"))


def _rotate(g: _Graph, x: str, cos: str, sin: str, half: int) -> str:
    """HF's rotate-half RoPE on [batch, heads, seq, head_dim]."""
    split = g.ints([half, half], "halves")
    from onnx import helper

    a, b = g.name("rope_lo"), g.name("rope_hi")
    g.nodes.append(helper.make_node("Split", [x, split], [a, b], axis=-1, name=a))
    rotated = g.op("Concat", g.op("Neg", b), a, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin), hint="rope")


def build_model(cfg: ModelConfig, params: dict):
    """The onnx.ModelProto for `params` (HF names, stacked layers, any float dtype -> float32)."""
    from onnx import TensorProto, helper

    if cfg.rope_type == "dynamic":
        raise ONNXError("rope_scaling 'dynamic' changes with the sequence length; the ONNX export has fixed RoPE")
    from smedjan.model.rope import inv_freq_and_scale

    p = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    hq, hkv, hd, n = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    group = hq // hkv
    g = _Graph()

    # Positions of this block's queries and keys, the causal/padding mask and RoPE tables: once per graph.
    past0 = "past_key_values.0.key"
    past_len = g.op("Gather", g.op("Shape", past0), g.ints(2, "axis2"), axis=0, hint="past_len")
    seq_len = g.op("Gather", g.op("Shape", "input_ids"), g.ints(1, "axis1"), axis=0, hint="seq_len")
    total = g.op("Add", past_len, seq_len, hint="total_len")
    one = g.ints(1, "one")
    kv_idx = g.op("Range", g.ints(0, "zero"), total, one, hint="kv_idx")  # [T]
    q_idx = g.op("Range", past_len, total, one, hint="q_idx")  # [S]
    q_col = g.op("Unsqueeze", q_idx, g.ints([1]))  # [S, 1]
    allowed = g.op("LessOrEqual", kv_idx, q_col)  # [S, T] causal
    if cfg.sliding_window is not None:
        allowed = g.op("And", allowed, g.op("Greater", kv_idx, g.op("Sub", q_col, g.ints(cfg.sliding_window))))
    pad_ok = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.ints([1, 2, 3])), to=TensorProto.BOOL)
    mask = g.op("And", pad_ok, allowed, hint="mask")  # [B, 1, 1, S, T] against grouped scores

    inv, scale = inv_freq_and_scale(cfg)
    angles = g.op(
        "Mul",
        g.op("Unsqueeze", g.op("Cast", "position_ids", to=TensorProto.FLOAT), g.ints([-1])),
        g.const(np.asarray(inv, np.float32), "inv_freq"),
    )  # [B, S, hd/2]
    emb = g.op("Unsqueeze", g.op("Concat", angles, angles, axis=-1), g.ints([1]))  # [B, 1, S, hd]
    cos = g.op("Mul", g.op("Cos", emb), g.const(np.float32(scale), "rope_scale"), hint="cos")
    sin = g.op("Mul", g.op("Sin", emb), g.const(np.float32(scale), "rope_scale"), hint="sin")

    embed = g.const(p["model.embed_tokens.weight"], "embed_tokens")
    x = g.op("Gather", embed, "input_ids", axis=0, hint="embed")
    heads_shape = g.ints([0, 0, -1, hd], "heads_shape")  # [B, S, heads, hd]
    grouped_shape = g.ints([0, hkv, group, -1, hd], "grouped_shape")
    merged_shape = g.ints([0, hq, -1, hd], "merged_shape")
    flat_shape = g.ints([0, 0, hq * hd], "flat_shape")
    inv_sqrt = g.const(np.float32(1 / np.sqrt(hd)), "inv_sqrt_hd")
    outputs = []

    for i in range(n):

        def w(name, i=i):
            key = LAYER_PREFIX + name
            return p[key][i] if key in p else None

        h = _rms_norm(g, x, g.const(w("input_layernorm.weight"), f"l{i}.ln1"), cfg.rms_norm_eps)

        def proj(kind, i=i, h=h):
            y = _linear(g, h, w(f"self_attn.{kind}_proj.weight"), w(f"self_attn.{kind}_proj.bias"), f"l{i}.{kind}")
            y = g.op("Transpose", g.op("Reshape", y, heads_shape), perm=[0, 2, 1, 3])  # [B, heads, S, hd]
            if cfg.qk_norm and kind in "qk":  # Qwen3 normalises each head before RoPE
                y = _rms_norm(g, y, g.const(w(f"self_attn.{kind}_norm.weight"), f"l{i}.{kind}_norm"), cfg.rms_norm_eps)
            return y

        q, k, v = proj("q"), proj("k"), proj("v")
        q, k = _rotate(g, q, cos, sin, hd // 2), _rotate(g, k, cos, sin, hd // 2)
        k = g.op("Concat", f"past_key_values.{i}.key", k, axis=2, hint=f"present{i}k")
        v = g.op("Concat", f"past_key_values.{i}.value", v, axis=2, hint=f"present{i}v")
        outputs += [(k, f"present.{i}.key"), (v, f"present.{i}.value")]

        # Grouped-query attention without copying k/v per query head: q [B, Hkv, G, S, hd] against
        # k/v [B, Hkv, 1, T, hd] (MatMul broadcasts the group axis).
        qg = g.op("Reshape", q, grouped_shape)
        kg = g.op("Unsqueeze", k, g.ints([2]))
        vg = g.op("Unsqueeze", v, g.ints([2]))
        scores = g.op("Mul", g.op("MatMul", qg, g.op("Transpose", kg, perm=[0, 1, 2, 4, 3])), inv_sqrt)
        scores = g.op("Where", mask, scores, g.const(np.float32(NEG), "neg"))
        attn = g.op("MatMul", g.op("Softmax", scores, axis=-1), vg)  # [B, Hkv, G, S, hd]
        attn = g.op("Reshape", g.op("Transpose", g.op("Reshape", attn, merged_shape), perm=[0, 2, 1, 3]), flat_shape)
        x = g.op("Add", x, _linear(g, attn, w("self_attn.o_proj.weight"), w("self_attn.o_proj.bias"), f"l{i}.o"))

        h = _rms_norm(g, x, g.const(w("post_attention_layernorm.weight"), f"l{i}.ln2"), cfg.rms_norm_eps)
        gate = _linear(g, h, w("mlp.gate_proj.weight"), None, f"l{i}.gate")
        up = _linear(g, h, w("mlp.up_proj.weight"), None, f"l{i}.up")
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up, hint="swiglu")
        x = g.op("Add", x, _linear(g, act, w("mlp.down_proj.weight"), None, f"l{i}.down"))

    x = _rms_norm(g, x, g.const(p["model.norm.weight"], "final_norm"), cfg.rms_norm_eps)
    if cfg.tie_word_embeddings:  # one copy of the table: the head transposes the embedding in the graph
        head = g.op("Transpose", embed, perm=[1, 0], hint="lm_head")
    else:
        head = g.const(np.ascontiguousarray(p["lm_head.weight"].T), "lm_head")
    g.output(g.op("MatMul", x, head), "logits")
    for src, name in outputs:
        g.output(src, name)

    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outs = [helper.make_tensor_value_info("logits", f, ["batch_size", "sequence_length", cfg.vocab_size])]
    for i in range(n):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", f, ["batch_size", hkv, "past_sequence_length", hd]
                )
            )
            outs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kind}", f, ["batch_size", hkv, "total_sequence_length", hd]
                )
            )
    graph = helper.make_graph(g.nodes, "smedjan_decoder", inputs, outs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="smedjan")
    model.ir_version = 8  # onnxruntime(-web) 1.17+ reads IR 8 with opset 17
    return model


def export_onnx(model: str, out: str | os.PathLike) -> Path:
    """HF folder (or hub id) -> folder with onnx/model.onnx, config and tokenizer files."""
    import onnx

    from smedjan.checkpoint import TOKENIZER_FILES, load_hf, replace_dir, resolve_path

    folder = resolve_path(model)
    cfg, params = load_hf(folder, dtype=np.float32)
    proto = build_model(cfg, params)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp-onnx")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "onnx").mkdir(parents=True)
    onnx.save_model(proto, str(tmp / "onnx" / "model.onnx"))
    onnx.checker.check_model(str(tmp / "onnx" / "model.onnx"))
    for fname in ("config.json", "generation_config.json", "smedjan_run.json", *TOKENIZER_FILES):
        if (folder / fname).is_file():
            shutil.copy2(folder / fname, tmp / fname)
    # transformers.js reads the cache layout and dtype from the config's transformers.js_config
    hf_cfg = json.loads((tmp / "config.json").read_text())
    hf_cfg["transformers.js_config"] = {"dtype": "fp32", "use_external_data_format": False}
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    return replace_dir(tmp, out, old_suffix=".old-onnx")

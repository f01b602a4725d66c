"""Activation-aware weight quantization (AWQ, Lin et al. 2023), the scale search without clipping.

A few input channels carry much larger activations than the rest, and the weights they multiply
matter more. For each group of linears that read the same input (q/k/v, gate/up, and o and down on
their own) AWQ scales those input channels of the weight up by s before rounding and the input down
by s at run time (`QuantizedWeight.in_scale` = 1/s), with s = mean|x|^alpha per input channel and
alpha in [0, 1] picked per group by grid search to minimise the group's output error on calibration
activations, || X W^T - X (Q(W s) / s)^T ||^2.

The activations come from the model itself: the layers run one at a time, eagerly, through
`smedjan.model.transformer.decoder_layer`, with each linear weight wrapped in a `_Probe` that records
its input (`linear` runs `w.linear(x)` for any such object). Each layer sees the float model's
hidden states.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from smedjan.backend import settings
from smedjan.config import ModelConfig
from smedjan.model.rope import rope_cos_sin
from smedjan.model.transformer import Ctx, decoder_layer, layer_params
from smedjan.quant.qweight import dequantize, quantize

f32 = jnp.float32
# Linears that share an input share one scale (and can then be joined into one kernel call).
GROUPS = (
    ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    ("self_attn.o_proj.weight",),
    ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    ("mlp.down_proj.weight",),
)
ALPHAS = tuple(i / 20 for i in range(21))
MAX_ROWS = 4096  # calibration rows kept per linear for the search


class _Probe:
    """A float weight that records its input when `linear` multiplies it (eager only)."""

    def __init__(self, w, sink: list):
        self.w, self.sink = w, sink

    def linear(self, x):
        self.sink.append(np.asarray(x.reshape(-1, x.shape[-1]), np.float32))
        return jnp.einsum("...i,oi->...o", x, self.w.astype(x.dtype))


def layer_inputs(params: dict, cfg: ModelConfig, tokens: np.ndarray, progress=None) -> list[dict[str, np.ndarray]]:
    """Per layer, {first weight name of each GROUP: its input rows [n, in]} on calibration `tokens` [B, S]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    x = jnp.take(params["model.embed_tokens.weight"], tokens, axis=0).astype(f32)
    cos, sin = rope_cos_sin(cfg, positions, seq_len=s)
    ctx = Ctx(settings(), cos, sin, positions, None, None)
    lp = layer_params(params)
    rng = np.random.default_rng(0)
    out = []
    for i in range(cfg.num_hidden_layers):
        sinks = {g[0]: [] for g in GROUPS}
        p = {k: v[i].astype(f32) for k, v in lp.items()}
        for group in GROUPS:
            for name in group:
                # only the first of a group records: the others read the same input
                p[name] = _Probe(p[name], sinks[group[0]] if name == group[0] else [])
        x, _ = decoder_layer(x, p, cfg, ctx)
        rows = {}
        for name, sink in sinks.items():
            a = np.concatenate(sink)
            rows[name] = a[rng.choice(len(a), MAX_ROWS, replace=False)] if len(a) > MAX_ROWS else a
        out.append(rows)
        if progress is not None:
            progress(i)
    return out


def _group_error(x, ws, scheme, group_size, s):
    err = 0.0
    for w in ws:
        wq = dequantize(quantize(w, scheme, group_size, in_scale=1.0 / s))
        err += float(jnp.sum(jnp.square(x @ (w - wq).T)))
    return err


def search_scale(x: np.ndarray, ws: list, scheme: str, group_size: int) -> tuple[jax.Array, float]:
    """(in_scale = 1/s [in], alpha) minimising the group's output error on inputs x [n, in]."""
    x = jnp.asarray(x, f32)
    act = jnp.maximum(jnp.mean(jnp.abs(x), axis=0), 1e-8)
    best = None
    for alpha in ALPHAS:
        s = act**alpha
        s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))  # centre the scales around 1
        err = _group_error(x, ws, scheme, group_size, s)
        if best is None or err < best[0]:
            best = (err, s, alpha)
    return 1.0 / best[1], best[2]


def awq_scales(
    params: dict, cfg: ModelConfig, tokens: np.ndarray, scheme: str, group_size: int, progress=None
) -> dict[str, jax.Array]:
    """{stacked weight name: in_scale [layers, in]} for every quantized linear of the layers."""
    inputs = layer_inputs(params, cfg, tokens)
    lp = layer_params(params)
    scales: dict[str, list] = {name: [] for group in GROUPS for name in group}
    for i, rows in enumerate(inputs):
        for group in GROUPS:
            ws = [lp[name][i].astype(f32) for name in group]
            in_scale, _ = search_scale(rows[group[0]], ws, scheme, group_size)
            for name in group:
                scales[name].append(in_scale)
        if progress is not None:
            progress(i)
    return {"model.layers." + name: jnp.stack(v) for name, v in scales.items()}

"""The model: one decoder-only transformer that training, prefill and decode all run."""

from smedjan.model.attention import attention
from smedjan.model.cache import KVCache, init_cache
from smedjan.model.transformer import forward, init_params, layer_params, lm_head, logits_fn, param_shapes, prepare

__all__ = [
    "KVCache",
    "attention",
    "forward",
    "init_cache",
    "init_params",
    "layer_params",
    "lm_head",
    "logits_fn",
    "param_shapes",
    "prepare",
]

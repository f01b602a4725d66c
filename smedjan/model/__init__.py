"""The smedjan transformer: parameters as a flat dict of HF-named arrays, pure functions over them."""

from smedjan.model.attention import attention
from smedjan.model.transformer import forward, init_cache, init_params, layer_params, lm_head, logits_fn, param_shapes

__all__ = ["attention", "forward", "init_cache", "init_params", "layer_params", "lm_head", "logits_fn", "param_shapes"]

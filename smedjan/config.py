"""Model configuration: one dataclass that mirrors a Hugging Face `config.json`.

Field names are the HF ones so that a config round-trips without a translation
table. Only decoder-only Llama-family architectures are accepted (llama, mistral,
qwen2, qwen3); anything smedjan would silently compute differently is an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smedjan.errors import UserError

SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
MAX_POSITIONS = 1 << 24  # past any released context; beyond it a typo (1e12) would allocate RoPE tables

# Keys every HF config may carry that do not change the forward pass.
_HARMLESS_KEYS = {
    "architectures",
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "initializer_range",
    "attention_dropout",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "id2label",
    "label2id",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "problem_type",
    "tokenizer_class",
    "task_specific_params",
    "prefix",
    "decoder_start_token_id",
    "sep_token_id",
    "is_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "torchscript",
    "use_bfloat16",
    "pruned_heads",
    "finetuning_task",
    "cross_attention_hidden_size",
    "tf_legacy_loss",
    "max_window_layers",
    "use_sliding_window",
    "layer_types",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "hidden_act",
    "mlp_bias",
    "pretraining_tp",
    "partial_rotary_factor",
    "_attn_implementation_autoset",
    "transformers.js_config",  # written by the ONNX export: which .onnx file transformers.js loads
}


class ConfigError(UserError, ValueError):
    """A config that smedjan cannot run exactly as transformers would."""


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": ..., "factor": ..., ...}; None = plain RoPE
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if not self.head_dim:
            heads, hidden = self.num_attention_heads, self.hidden_size
            if isinstance(heads, int) and heads > 0 and isinstance(hidden, int):
                if hidden % heads:
                    raise ConfigError(
                        f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}) "
                        "unless head_dim is given"
                    )
                self.head_dim = hidden // heads
        self.validate()

    def __hash__(self):  # jit takes the config as a static argument
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    # ---- derived architecture switches -------------------------------------------------
    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    def validate(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; smedjan runs {sorted(SUPPORTED_MODEL_TYPES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_position_embeddings > MAX_POSITIONS:
            raise ConfigError(
                f"max_position_embeddings must be at most {MAX_POSITIONS}, got {self.max_position_embeddings}"
            )
        for name, lo, hi in (("rms_norm_eps", 0.0, 1.0), ("rope_theta", 0.0, math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value < hi:
                raise ConfigError(f"{name} must be a number in ({lo}, {hi}), got {value!r}")
        for name in ("tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            if value is None or value == []:
                continue
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ConfigError(f"{name} must be a token id (or null), got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be positive or null, got {self.sliding_window}")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling.rope_type {self.rope_type!r} is not supported; use one of {ROPE_TYPES}")
        if self.rope_type != "default":
            factor = self.rope_scaling.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
                raise ConfigError(f"rope_scaling of type {self.rope_type!r} needs a positive 'factor', got {factor!r}")
        if self.rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise ConfigError(f"rope_scaling of type 'llama3' needs {key!r}")

    # ---- sizes ----------------------------------------------------------------------------
    def num_params(self) -> int:
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
        if self.qkv_bias:
            per_layer += q + 2 * kv
        if self.o_bias:
            per_layer += d
        if self.qk_norm:
            per_layer += 2 * hd
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_hidden_layers * per_layer + d

    def matmul_params(self) -> int:
        """Parameters that do matrix work per token: all but the embedding lookup (a tied table
        still counts once, as the LM head)."""
        return self.num_params() - self.vocab_size * self.hidden_size * (0 if self.tie_word_embeddings else 1)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N (matmul params, embedding lookup excluded) + attention.

        Attention counts 12·L·H·hd·S/2 (QK^T and PV, forward+backward, causal halves it),
        the PaLM-appendix convention.
        """
        n = self.matmul_params()
        attn = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len / 2
        return 6 * n + attn

    # ---- HF config.json ---------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; smedjan loads {sorted(SUPPORTED_MODEL_TYPES)}"
            )
        quant = d.pop("quantization_config", None)
        if quant is not None and (not isinstance(quant, dict) or quant.get("quant_method") != "smedjan"):
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            raise ConfigError(
                f"field 'quantization_config': {method!r} checkpoints cannot be loaded (smedjan reads its own, "
                "quant_method 'smedjan', written by `smedjan quantize`)"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in fields and k not in _HARMLESS_KEYS)
        if unknown:
            raise ConfigError(f"unsupported config field {unknown[0]!r} (all unknown: {unknown})")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"field 'hidden_act': only 'silu' (SwiGLU) is supported, got {d['hidden_act']!r}")
        if d.get("mlp_bias"):
            raise ConfigError("field 'mlp_bias': biased MLPs are not supported")
        if d.get("pretraining_tp", 1) != 1:
            raise ConfigError("field 'pretraining_tp': only 1 is supported")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("field 'partial_rotary_factor': partial RoPE is not supported")
        if model_type == "qwen2" and "attention_bias" in d:
            d.pop("attention_bias")  # qwen2's q/k/v biases are unconditional

        rope_theta, rope_scaling = _read_rope(d)
        sliding_window = _read_sliding_window(d, model_type)
        kwargs = {k: v for k, v in d.items() if k in fields}
        kwargs.update(rope_theta=rope_theta, rope_scaling=rope_scaling, sliding_window=sliding_window)
        kwargs.setdefault("num_key_value_heads", kwargs.get("num_attention_heads", 8))
        kwargs.setdefault("tie_word_embeddings", False if model_type in ("llama", "mistral") else True)
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = 0
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": [SUPPORTED_MODEL_TYPES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "rope_parameters": {
                "rope_type": self.rope_type,
                "rope_theta": self.rope_theta,
                **{k: v for k, v in (self.rope_scaling or {}).items() if k != "rope_type"},
            },
            "dtype": "bfloat16",
        }
        if self.model_type != "qwen2":
            d["attention_bias"] = self.attention_bias
        if self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            d["max_window_layers"] = 0 if self.sliding_window is not None else self.num_hidden_layers
        else:
            d["sliding_window"] = self.sliding_window
            if self.model_type == "llama" and self.sliding_window is not None:
                raise ConfigError("llama has no sliding window in transformers; use model_type 'mistral'")
        return d

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (ValueError, OSError) as e:  # JSON, UTF-8
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except (TypeError, ValueError, AttributeError) as e:  # a value of a type no check above expected
            raise ConfigError(f"{path}: malformed config ({type(e).__name__}: {e})") from None

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _read_rope(d: dict) -> tuple[float, dict | None]:
    """Accept both spellings: legacy `rope_theta` + `rope_scaling`, and v5 `rope_parameters`."""
    params = d.get("rope_parameters")
    for key in ("rope_parameters", "rope_scaling"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ConfigError(f"field {key!r} must be an object, got {d[key]!r}")
    if params is None:
        params = dict(d.get("rope_scaling") or {})
        params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    else:
        params = dict(params)
        if "rope_type" not in params and "type" not in params and d.get("rope_scaling"):
            params.update(d["rope_scaling"])
    if "type" in params and "rope_type" not in params:  # oldest spelling
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ConfigError(f"field 'rope_theta' must be a number, got {theta!r}")
    theta = float(theta)
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"field 'rope_scaling': rope_type {rope_type!r} is not supported; use one of {ROPE_TYPES}")
    if rope_type == "default":
        return theta, None
    if rope_type == "yarn":
        params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
    if "partial_rotary_factor" in params and params.pop("partial_rotary_factor") != 1.0:
        raise ConfigError("field 'rope_parameters.partial_rotary_factor': partial RoPE is not supported")
    return theta, params


def _read_sliding_window(d: dict, model_type: str) -> int | None:
    if model_type == "mistral":
        return d.get("sliding_window")
    if model_type == "llama":
        return None
    # qwen2/qwen3: a window only when use_sliding_window, and then per layer from max_window_layers.
    layer_types = d.get("layer_types")
    window = d.get("sliding_window")
    if layer_types is not None:
        kinds = set(layer_types)
        if kinds == {"full_attention"}:
            return None
        if kinds == {"sliding_attention"}:
            return window
        raise ConfigError("field 'layer_types': a mix of sliding and full attention layers is not supported")
    if not d.get("use_sliding_window") or window is None:
        return None
    if d.get("max_window_layers", 0) not in (0,):
        if d["max_window_layers"] >= d["num_hidden_layers"]:
            return None
        raise ConfigError("field 'max_window_layers': a mix of sliding and full attention layers is not supported")
    return window


# ---- presets ---------------------------------------------------------------------------------
# Shapes follow the usual Llama ratios; head_dim is 64 or 128 wherever the Pallas kernels matter.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=8192,
        max_position_embeddings=512,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8192,
        max_position_embeddings=1024,
    ),
    "medium": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8192,
        max_position_embeddings=1024,
    ),
    "125m": dict(
        hidden_size=768,
        intermediate_size=2560,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "350m": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
        rope_theta=500000.0,
    ),
    "6.5b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {list(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def memory_report(cfg: ModelConfig, param_bytes: int = 4, optimizer_states: int = 2) -> dict[str, float]:
    """GiB for parameters, gradients and AdamW state at the given parameter precision."""
    n = cfg.num_params()
    gib = 1024**3
    return {
        "params_gib": n * param_bytes / gib,
        "grads_gib": n * param_bytes / gib,
        "optimizer_gib": n * 4 * optimizer_states / gib,
        "bf16_inference_gib": n * 2 / gib,
    }


def human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.1f}P"


def resolve_config(spec: str, **overrides) -> ModelConfig:
    """A preset name, a config.json path or a folder holding one."""
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        cfg = ModelConfig.from_json_file(path)
        return cfg.replace(**overrides) if overrides else cfg
    if spec not in PRESETS and ("/" in spec or "\\" in spec or spec.startswith((".", "~")) or spec.endswith(".json")):
        raise ConfigError(f"{spec}: no such file or folder (and not a preset: {', '.join(PRESETS)})")
    return preset(spec, **overrides)

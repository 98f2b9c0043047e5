"""Model configuration whose fields ARE the ``config.json`` keys.

One dataclass covers the decoder-only families folklm implements (Llama 1/2/3.x, Mistral,
Mixtral, Qwen2, Qwen3(-MoE), Gemma 2, Gemma 3, Phi-3, OLMo 2). Field names are exactly the
Hugging Face ``config.json`` keys so a config round-trips without a translation table.
Both spellings of the RoPE settings are accepted:
the classic ``rope_theta`` + ``rope_scaling`` and transformers 5's ``rope_parameters``
(Gemma 3's per-layer-type ``rope_parameters`` become ``rope_theta``/``rope_scaling`` for the
global layers and ``rope_local_base_freq`` for the sliding ones, transformers 4's spelling).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from folklm.errors import ConfigError

SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo2",
)
# The feed-forward activations, by their transformers (``ACT2FN``) names.
ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh")


@dataclass
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer, named as in ``config.json``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool | None = None  # qwen2/3: the window is ignored unless True
    num_local_experts: int | None = None  # mixtral
    num_experts_per_tok: int | None = None  # mixtral
    # Gemma 2/3: activation name, attention scale 1/sqrt(query_pre_attn_scalar), tanh caps,
    # per-layer attention kinds, the RoPE base of the sliding layers
    hidden_activation: str | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_types: list[str] | None = None
    rope_local_base_freq: float | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    # Anything else from config.json, kept so that saving writes it back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            hint = ""
            if self.model_type == "gemma3":  # Gemma3ForConditionalGeneration
                hint = " (Gemma 3 with its vision tower: only the text model, gemma3_text, runs)"
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}{hint}; "
                f"folklm supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.model_type == "qwen2":
            # Qwen2 always has q/k/v biases; its sliding window is only active when asked.
            self.attention_bias = True
            if not self.use_sliding_window:
                self.sliding_window = None
        if self.model_type in ("qwen3", "qwen3_moe") and not self.use_sliding_window:
            self.sliding_window = None
        if self.model_type in ("gemma2", "gemma3_text"):  # transformers' config defaults
            self.hidden_activation = self.hidden_activation or "gelu_pytorch_tanh"
            if self.query_pre_attn_scalar is None:
                self.query_pre_attn_scalar = 256
        if self.model_type == "gemma3_text" and self.rope_local_base_freq is None:
            self.rope_local_base_freq = 10000.0
        if self.model_type in ("gemma2", "gemma3_text") and self.layer_types is None:
            # every sliding_window_pattern-th layer is global (Gemma 2: 2, Gemma 3: 6)
            default = 2 if self.model_type == "gemma2" else 6
            every = int(self.extra.get("sliding_window_pattern", default))
            self.layer_types = [
                "full_attention" if (i + 1) % every == 0 else "sliding_attention"
                for i in range(self.num_hidden_layers)
            ]
        if self.model_type == "mixtral" and not (
            self.num_local_experts and self.num_experts_per_tok
        ):
            raise ConfigError("mixtral config needs num_local_experts and num_experts_per_tok")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"unsupported activation {self.activation!r}; "
                f"expected one of {', '.join(ACTIVATIONS)}"
            )
        partial = self.extra.get("partial_rotary_factor")
        if partial is not None and float(partial) != 1.0:
            raise ConfigError(
                f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported"
            )
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )

    @property
    def activation(self) -> str:
        """The feed-forward activation: Gemma names it ``hidden_activation``."""
        return self.hidden_activation or self.hidden_act

    @property
    def kv_heads(self) -> int:
        """``num_key_value_heads``, which ``__post_init__`` fills in when the file omits it."""
        assert self.num_key_value_heads is not None, "set by __post_init__"
        return self.num_key_value_heads

    @property
    def head_size(self) -> int:
        """``head_dim``, which ``__post_init__`` derives when the file omits it."""
        assert self.head_dim is not None, "set by __post_init__"
        return self.head_dim

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a ``config.json`` dict, keeping unknown keys in ``extra``."""
        d = dict(d)
        if "model_type" not in d:
            raise ConfigError("config has no 'model_type' field")
        rope_params = d.pop("rope_parameters", None)
        if rope_params and "full_attention" in rope_params:  # one set per layer type (Gemma 3)
            local = dict(rope_params.get("sliding_attention") or {})
            if local.get("rope_type", "default") != "default":
                raise ConfigError("RoPE scaling on sliding-window layers is not supported")
            if "rope_theta" in local:
                d.setdefault("rope_local_base_freq", local["rope_theta"])
            rope_params = rope_params["full_attention"]
        if rope_params:  # transformers >= 5 folds rope_theta into rope_parameters
            rope_params = dict(rope_params)
            d.setdefault("rope_theta", rope_params.pop("rope_theta", 10000.0))
            if "partial_rotary_factor" in rope_params:
                d.setdefault("partial_rotary_factor", rope_params.pop("partial_rotary_factor"))
            if rope_params.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", rope_params)
        if d.get("dtype") and not d.get("torch_dtype"):
            d["torch_dtype"] = d["dtype"]
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        for key in required:
            if known.get(key) is None:
                raise ConfigError(f"config is missing required field {key!r}")
        return cls(**known, extra=extra)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{path}: bad field ({e})") from None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        return {k: v for k, v in d.items() if v is not None}

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

"""Hyper-parameters of a GGUF file as a Hugging Face ``config.json`` dict.

GGUF stores them as ``<arch>.<key>`` metadata (key names: ``gguf.constants.Keys`` in llama.cpp's
gguf-py, written by ``convert_hf_to_gguf.py``): ``block_count`` -> ``num_hidden_layers``,
``embedding_length`` -> ``hidden_size``, ``attention.head_count_kv`` -> ``num_key_value_heads``,
``rope.freq_base`` -> ``rope_theta`` and so on. Two things are not plain keys:

* Mixtral is arch ``llama`` with ``expert_count > 0``;
* Llama 3.1 RoPE scaling is stored as a ``rope_freqs.weight`` tensor of per-frequency factors
  (``LlamaModel.generate_extra_tensors``); the ``llama3`` ``rope_scaling`` dict is recovered
  from it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from folklm.errors import CheckpointError

SUPPORTED_ARCHITECTURES = (
    "llama",
    "qwen2",
    "qwen3",
    "qwen3moe",
    "gemma2",
    "gemma3",
    "phi3",
    "olmo2",
)
# GGUF architecture -> Hugging Face model_type, where they differ
MODEL_TYPES = {"gemma3": "gemma3_text", "qwen3moe": "qwen3_moe"}


def config_from_metadata(path: Path, meta: dict[str, Any], infos: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` dict a GGUF file describes.

    Args:
        path: the file, for error messages.
        meta: its metadata (keys as in the file).
        infos: its tensor infos by GGUF name (which tensors exist decides tying, biases and
            Llama 3 RoPE scaling).

    Raises:
        CheckpointError: unsupported architecture or RoPE variant, or a required key missing.
    """
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported architecture {arch!r}; folklm reads GGUF architectures "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Mixtral is 'llama' with experts)"
        )

    def get(key: str, default: Any = ...) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is ...:
            raise CheckpointError(f"{path}: missing metadata key '{arch}.{key}'")
        if isinstance(value, list):
            raise CheckpointError(f"{path}: per-layer '{arch}.{key}' is not supported")
        return value

    model_type = MODEL_TYPES.get(arch, arch)

    hidden = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", 0) or get("rope.dimension_count", 0) or 0)
    rope_dims = int(get("rope.dimension_count", head_dim) or head_dim)
    if head_dim and rope_dims != head_dim:
        raise CheckpointError(
            f"{path}: partial rotary embedding (rope.dimension_count {rope_dims} < head "
            f"dim {head_dim}) is not supported"
        )
    # The embedding's rows are the model's vocabulary; the token list may be shorter.
    embd = infos.get("token_embd.weight")
    vocab = meta.get(f"{arch}.vocab_size") or (int(embd.shape[-1]) if embd is not None else 0)
    vocab = vocab or len(meta.get("tokenizer.ggml.tokens") or ())
    theta = float(get("rope.freq_base", 10000.0))
    experts = int(get("expert_count", 0) or 0)
    config: dict[str, Any] = {
        "model_type": "mixtral" if arch == "llama" and experts else model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_scaling": None,
        "tie_word_embeddings": "output.weight" not in infos,
        "hidden_act": "silu",
        "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in infos,
    }
    if head_dim and head_dim != hidden // n_head:
        config["head_dim"] = head_dim
    config["rope_scaling"] = _rope_scaling(
        path, meta, arch, infos, theta, head_dim or hidden // n_head
    )
    if (window := get("attention.sliding_window", None)) is not None:
        config["sliding_window"] = int(window)
        if arch in ("qwen2", "qwen3", "qwen3moe"):
            config["use_sliding_window"] = True
    if model_type in ("gemma2", "gemma3_text"):
        config.update(_gemma(path, meta, arch, config, head_dim or hidden // n_head))
    if experts:
        config["num_local_experts"] = experts
        config["num_experts_per_tok"] = int(get("expert_used_count"))
    if model_type == "qwen3_moe":  # llama.cpp renormalises the top-k weights (norm_w)
        config["moe_intermediate_size"] = int(get("expert_feed_forward_length"))
        config["norm_topk_prob"] = True
    config.update(generation_config(meta))
    return config


def _gemma(path: Path, meta: dict, arch: str, config: dict, head_dim: int) -> dict[str, Any]:
    """What llama.cpp hard-codes for Gemma 2 and 3 (``llama_model::load_hparams``) as config
    keys: every 2nd (Gemma 2) or 6th (Gemma 3) layer global, Gemma 3's local RoPE base 10k,
    queries scaled by ``1/sqrt(head_dim)`` (``hidden/heads`` for the 27B models), GeGLU;
    Gemma 2's soft-capping values are keys of the file."""
    n_layers = config["num_hidden_layers"]
    gemma3 = arch == "gemma3"
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", 6 if gemma3 else 2)
    if isinstance(pattern, list):  # one flag per layer: True = sliding
        if len(pattern) != n_layers:
            raise CheckpointError(
                f"{path}: '{arch}.attention.sliding_window_pattern' has {len(pattern)} "
                f"entries for {n_layers} layers"
            )
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [(i + 1) % int(pattern) != 0 for i in range(n_layers)]
    big = n_layers == (62 if gemma3 else 46)  # the 27B models
    scalar = config["hidden_size"] // config["num_attention_heads"] if big else head_dim
    out: dict[str, Any] = {
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "attention_bias": False,
    }
    if gemma3:
        out["rope_local_base_freq"] = float(meta.get(f"{arch}.rope.freq_base_swa", 10000.0))
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if (cap := meta.get(f"{arch}.{key}")) is not None:
            out[key] = float(cap)
    return out


def _rope_scaling(
    path: Path, meta: dict, arch: str, infos: dict, theta: float, head_dim: int
) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor") or meta.get(f"{arch}.rope.scale_linear")
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if "rope_factors_long.weight" in infos:  # Phi-3 longrope (convert_hf_to_gguf Phi3MiniModel)
        factors = {}
        for kind in ("long", "short"):
            info = infos.get(f"rope_factors_{kind}.weight")
            if info is None or info.tensor_type != GGMLQuantizationType.F32:
                raise CheckpointError(f"{path}: rope_factors_{kind}.weight missing or not F32")
            factors[f"{kind}_factor"] = [float(x) for x in np.asarray(info.data, np.float64)]
        longrope: dict[str, Any] = {"rope_type": "longrope", **factors}
        longrope["original_max_position_embeddings"] = int(original or 4096)
        if (attn := meta.get(f"{arch}.rope.scaling.attn_factor")) is not None:
            longrope["attention_factor"] = float(attn)
        return longrope
    if "rope_freqs.weight" in infos:
        freqs = infos["rope_freqs.weight"]
        if freqs.tensor_type != GGMLQuantizationType.F32:
            raise CheckpointError(f"{path}: rope_freqs.weight must be F32")
        return _llama3_rope_scaling(
            path, np.asarray(freqs.data, np.float64), theta, head_dim, original
        )
    if kind in (None, "none") and not factor:
        return None
    if kind in (None, "linear", "yarn"):
        if factor is None:
            raise CheckpointError(f"{path}: rope scaling type {kind!r} without a scaling factor")
        if kind != "yarn":
            return {"rope_type": "linear", "factor": float(factor)}
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise CheckpointError(
        f"{path}: unsupported rope scaling type {kind!r} in '{arch}.rope.scaling.type'"
    )


def _llama3_rope_factors(
    inv_freq: np.ndarray, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """llama.cpp's per-frequency wavelength factors for Llama 3.1 scaling (convert_hf_to_gguf)."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid))


def _llama3_rope_scaling(
    path: Path, factors: np.ndarray, theta: float, head_dim: int, original: int | None
) -> dict[str, Any] | None:
    """Recover HF's ``llama3`` rope_scaling from the factors llama.cpp stored."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv_freq.shape:
        raise CheckpointError(
            f"{path}: rope_freqs.weight has {factors.size} entries, expected {inv_freq.size}"
        )
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    original = int(original or 8192)
    low, high = 1.0, 4.0  # Llama 3.1 / 3.2 values; fitted below if the file used others
    if not np.allclose(
        _llama3_rope_factors(inv_freq, factor, low, high, original), factors, rtol=1e-4
    ):
        # In the smooth band 1/f = (1-s)/factor + s with s = (original/wavelen - low)/(high-low),
        # so s is linear in original/wavelen: slope 1/(high-low), intercept -low/(high-low).
        band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
        if band.sum() >= 2:
            s = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
            slope, intercept = np.polyfit(original * inv_freq[band] / (2 * math.pi), s, 1)
            low, high = -intercept / slope, (1 - intercept) / slope
        if not np.allclose(
            _llama3_rope_factors(inv_freq, factor, low, high, original), factors, rtol=1e-4
        ):
            raise CheckpointError(f"{path}: rope_freqs.weight does not match llama3 rope scaling")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": round(float(low), 6),
        "high_freq_factor": round(float(high), 6),
        "original_max_position_embeddings": original,
    }


def generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    """``generation_config.json`` ids; every stop token the file names (eos, eot, eom) is kept."""

    def tid(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        return int(value) if value is not None else None

    eos = [
        t for t in (tid("eos_token_id"), tid("eot_token_id"), tid("eom_token_id")) if t is not None
    ]
    eos = list(dict.fromkeys(eos))
    return {
        "bos_token_id": tid("bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": tid("padding_token_id"),
    }

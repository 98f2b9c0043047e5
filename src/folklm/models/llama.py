"""Llama 1/2/3.x, Mistral and Qwen2: the decoder-only transformer of the open-model era.

LLaMA (Touvron et al., 2023, arXiv:2302.13971): pre-norm RMSNorm, SwiGLU MLP, rotary
position embeddings, no biases. Llama 2 adds grouped-query attention (GQA, Ainslie et al.,
2023, arXiv:2305.13245) for the large sizes; Llama 3.1 adds ``llama3`` RoPE scaling; 3.2
ties the input embedding and the LM head. Mistral 7B (arXiv:2310.06825) is the same block
with a sliding attention window; Qwen2 (arXiv:2407.10671) adds biases to q/k/v.

Parameter names are the Hugging Face names, so a ``model.safetensors`` loads as is and
PEFT adapters address the same modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from folklm.cache import Cache, Masks, Window, full_feed
from folklm.config import ModelConfig
from folklm.ops.attention import attention
from folklm.ops.rope import RotaryEmbedding, apply_rotary

Ropes = dict[Window, tuple[torch.Tensor, torch.Tensor]]  # window -> (cos, sin) (B, 1, T, D)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019, arXiv:1910.07467).

    Normalised in float32, cast back, then scaled: the order transformers uses, so bfloat16
    runs round the same way (and it is faster on CPU than ``F.rms_norm``'s composite).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Attention(nn.Module):
    """Grouped-query attention with rotary positions.

    The attention scale (``query_pre_attn_scalar``) and score cap (``attn_logit_softcapping``)
    come from the config (Gemma sets them; None elsewhere). Families that transform q/k
    before the rotation override :meth:`project`.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.head_size
        bias = config.attention_bias
        C = config.hidden_size
        self.q_proj = nn.Linear(C, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, C, bias=False)
        # Inference may replace q/k/v by one fused projection (engine.fast); the state dict
        # keeps the three HF names either way.
        self.qkv_proj: nn.Module | None = None
        scalar = config.query_pre_attn_scalar
        self.scale = None if scalar is None else float(scalar) ** -0.5
        self.softcap = config.attn_logit_softcapping

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, D), k and v (B, H_kv, T, D), before the rotation."""
        B, T, _ = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(B, T, H + 2 * H_kv, D).transpose(1, 2)
            return qkv[:, :H], qkv[:, H : H + H_kv], qkv[:, H + H_kv :]
        # (B, T, H*D) -> (B, H, T, D)
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
        k = self.k_proj(x).view(B, T, H_kv, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H_kv, D).transpose(1, 2)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = rope
        q, k, v = self.project(x)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H_kv, S, D)
        y = attention(q, k, v, mask, scale=self.scale, softcap=self.softcap)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class QKNormAttention(Attention):
    """Attention with a norm over each head's queries and keys before the rotation (Qwen3,
    Gemma 3: ``q_norm``/``k_norm`` of size ``head_dim``)."""

    def __init__(self, config: ModelConfig, layer_idx: int, norm: type[nn.Module] | None = None):
        super().__init__(config, layer_idx)
        norm = norm or RMSNorm
        self.q_norm = norm(self.head_dim, config.rms_norm_eps)
        self.k_norm = norm(self.head_dim, config.rms_norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)
        return self.q_norm(q), self.k_norm(k), v


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer, 2020, arXiv:2002.05202); GeGLU with Gemma's activation."""

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        self.act = ACTIVATIONS[config.activation]
        C, F_ = config.hidden_size, intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(C, F_, bias=config.mlp_bias)
        self.up_proj = nn.Linear(C, F_, bias=config.mlp_bias)
        self.down_proj = nn.Linear(F_, C, bias=config.mlp_bias)
        self.gate_up_proj: nn.Module | None = None  # fused gate + up (engine.fast), optional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_idx: int,
        mlp: nn.Module | None = None,
        mlp_name: str = "mlp",
        attn: nn.Module | None = None,
    ):
        super().__init__()
        self.self_attn = attn if attn is not None else Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.sliding_window = layer_sliding_window(config, layer_idx)
        # Mixtral's checkpoint calls the feed-forward "block_sparse_moe"; keep HF names.
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp if mlp is not None else MLP(config))

    def forward(
        self, x: torch.Tensor, ropes: Ropes, cache: Cache | None, masks: Masks
    ) -> torch.Tensor:
        w = self.sliding_window
        x = x + self.self_attn(self.input_layernorm(x), ropes[w], cache, masks[w])
        return x + getattr(self, self.mlp_name)(self.post_attention_layernorm(x))


def layer_sliding_window(config: ModelConfig, layer_idx: int) -> int | None:
    """The attention window of one layer: Mistral uses it everywhere, Qwen2 and Gemma per
    ``layer_types``."""
    if config.sliding_window is None:
        return None
    layer_types = config.layer_types
    if layer_types is not None:
        return config.sliding_window if layer_types[layer_idx] == "sliding_attention" else None
    if config.model_type == "qwen2":
        first = config.extra.get("max_window_layers", config.num_hidden_layers)
        return config.sliding_window if layer_idx >= first else None
    return config.sliding_window


MakeLayer = Callable[[ModelConfig, int], nn.Module]  # (config, layer index) -> layer


class DecoderModel(nn.Module):
    """The stack: embeddings, decoder layers, final norm (HF's ``model.`` prefix)."""

    def __init__(
        self, config: ModelConfig, make_layer: MakeLayer = DecoderLayer, norm: type = RMSNorm
    ):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(make_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = norm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class CausalLM(nn.Module):
    """Decoder + LM head. ``forward`` runs with or without a KV cache.

    Without a cache, ``input_ids`` is the whole sequence (training, parity tests). With a
    cache, ``input_ids`` continues the cached sequence; the cache says where its tokens
    sit (positions, masks: ``folklm.cache.Cache``) and advances by T afterwards.
    """

    def __init__(
        self, config: ModelConfig, make_layer: MakeLayer = DecoderLayer, norm: type = RMSNorm
    ):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, make_layer, norm)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # the attention windows of the layers (None: full), each once, for ``Cache.feed``
        self.windows: list[Window] = sorted(
            {cast(DecoderLayer, layer).sliding_window for layer in self.model.layers},
            key=lambda w: w or 0,
        )

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        *,
        logits: Literal["all", "last"] = "all",
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in float32, or (B, 1, vocab) for ``logits="last"``.

        Args:
            input_ids: (B, T) token ids.
            cache: KV cache to read and extend, or None for a full forward pass.
            logits: "last" computes the LM head for the last position only (generation).
        """
        x = self._decode(input_ids, cache)
        if logits == "last":
            x = x[:, -1:]
        out = self.lm_head(self.model.norm(x)).float()
        if (cap := self.config.final_logit_softcapping) is not None:  # Gemma 2
            out = torch.tanh(out / cap) * cap
        return out

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, C) (Gemma scales them)."""
        return self.model.embed_tokens(input_ids)

    def ropes(self, positions: torch.Tensor, dtype: torch.dtype) -> Ropes:
        """(cos, sin) for each attention window (Gemma 3's sliding layers use another base)."""
        rope = self.model.rotary_emb(positions, dtype)
        return dict.fromkeys(self.windows, rope)

    def hidden_states(self, input_ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, C) (training losses, embeddings)."""
        return self.model.norm(self._decode(input_ids, cache))

    def _decode(self, input_ids: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        B, T = input_ids.shape
        if cache is None:
            feed = full_feed(B, T, self.windows, input_ids.device)
        else:
            feed = cache.feed(T, self.windows)
        x = self.embed(input_ids)  # (B, T, C)
        ropes = self.ropes(feed.positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, ropes, cache, feed.masks)
        if cache is not None:
            cache.advance(T)
        return x


def build(config: ModelConfig) -> CausalLM:
    return CausalLM(config)

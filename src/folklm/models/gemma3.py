"""Gemma 3 (text): Gemma 2's sandwich-normed block with q/k norms and two RoPE bases.

Gemma 3 Technical Report (Gemma Team, 2025, arXiv:2503.19786). Against Llama:

- RMSNorm scales by ``1 + weight`` (weights stored as offsets from one), computed in float32;
- four norms per layer: before and after attention (``input_layernorm``,
  ``post_attention_layernorm``), before and after the feed-forward
  (``pre_feedforward_layernorm``, ``post_feedforward_layernorm``);
- embeddings multiplied by ``sqrt(hidden_size)``; GeGLU feed-forward (tanh GELU);
- queries scaled by ``query_pre_attn_scalar ** -0.5``; each head's queries and keys are
  RMS-normed (``q_norm``, ``k_norm``) before the rotation;
- local layers attend within ``sliding_window`` and rotate with base
  ``rope_local_base_freq`` (10k); every ``sliding_window_pattern``-th layer (6) is global,
  with base ``rope_theta`` (1M) and the config's RoPE scaling (``layer_types`` says which).

Gemma 2 is the same block without q/k norms, with one RoPE base and tanh soft-capping of the
attention scores and the final logits (``models/gemma2.py``). Names are Hugging Face's
(``Gemma3ForCausalLM``, model_type ``gemma3_text``).
"""

from __future__ import annotations

import torch
from torch import nn

from folklm.cache import Cache, Masks
from folklm.config import ModelConfig
from folklm.models.llama import MLP, Attention, CausalLM, QKNormAttention, Ropes


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaling by ``1 + weight``, in float32, cast back last (transformers' order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class GemmaDecoderLayer(nn.Module):
    """Norms before and after both attention and feed-forward (Gemma 2 and 3)."""

    def __init__(self, config: ModelConfig, layer_idx: int, attn: Attention):
        super().__init__()
        C, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = attn
        self.mlp = MLP(config)
        self.input_layernorm = GemmaRMSNorm(C, eps)
        self.post_attention_layernorm = GemmaRMSNorm(C, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(C, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(C, eps)
        kind = (config.layer_types or ["full_attention"] * (layer_idx + 1))[layer_idx]
        self.sliding_window = config.sliding_window if kind == "sliding_attention" else None

    def forward(
        self, x: torch.Tensor, ropes: Ropes, cache: Cache | None, masks: Masks
    ) -> torch.Tensor:
        w = self.sliding_window
        h = self.self_attn(self.input_layernorm(x), ropes[w], cache, masks[w])
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class GemmaCausalLM(CausalLM):
    """Scaled embeddings; sliding layers rotate with the local base when the config has one."""

    def __init__(self, config: ModelConfig, attn: type[Attention]):
        def make_layer(cfg: ModelConfig, i: int) -> nn.Module:
            return GemmaDecoderLayer(cfg, i, attn(cfg, i))

        super().__init__(config, make_layer, GemmaRMSNorm)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        # sqrt(hidden) rounded to the weights' dtype first, as transformers does
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)

    def ropes(self, positions: torch.Tensor, dtype: torch.dtype) -> Ropes:
        if self.config.rope_local_base_freq is None:  # Gemma 2: one base
            return super().ropes(positions, dtype)
        full = self.model.rotary_emb(positions, dtype)
        local = self.model.rotary_emb(positions, dtype, local=True)
        return {w: full if w is None else local for w in self.windows}


class Gemma3Attention(QKNormAttention):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx, GemmaRMSNorm)


def build(config: ModelConfig) -> CausalLM:
    return GemmaCausalLM(config, Gemma3Attention)

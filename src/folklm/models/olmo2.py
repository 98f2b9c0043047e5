"""OLMo 2: norms after attention and feed-forward, and RMS norms over all queries and keys.

2 OLMo 2 Furious (OLMo Team, 2024, arXiv:2501.00656). Against Llama, the block normalises the
*outputs* of attention and the feed-forward before adding them to the residual stream
(``post_attention_layernorm``, ``post_feedforward_layernorm``; no norm on the inputs), and the
projected queries and keys are RMS-normed across all heads at once (``q_norm`` of size
``heads * head_dim``, ``k_norm`` of size ``kv_heads * head_dim``) before the rotation. Names
are Hugging Face's (``Olmo2ForCausalLM``).
"""

from __future__ import annotations

import torch
from torch import nn

from folklm.cache import Cache, Masks
from folklm.config import ModelConfig
from folklm.models.llama import MLP, Attention, CausalLM, RMSNorm, Ropes, layer_sliding_window


class Olmo2Attention(Attention):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        D, eps = self.head_dim, config.rms_norm_eps
        self.q_norm = RMSNorm(self.n_heads * D, eps)
        self.k_norm = RMSNorm(self.n_kv_heads * D, eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)  # (B, H, T, D): norm over (H, D) of each token

        def across_heads(t: torch.Tensor, norm: nn.Module) -> torch.Tensor:
            B, H, T, D = t.shape
            flat = t.transpose(1, 2).reshape(B, T, H * D)
            return norm(flat).view(B, T, H, D).transpose(1, 2)

        return across_heads(q, self.q_norm), across_heads(k, self.k_norm), v


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Olmo2Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.sliding_window = layer_sliding_window(config, layer_idx)

    def forward(
        self, x: torch.Tensor, ropes: Ropes, cache: Cache | None, masks: Masks
    ) -> torch.Tensor:
        w = self.sliding_window
        x = x + self.post_attention_layernorm(self.self_attn(x, ropes[w], cache, masks[w]))
        return x + self.post_feedforward_layernorm(self.mlp(x))


def build(config: ModelConfig) -> CausalLM:
    return CausalLM(config, Olmo2DecoderLayer)

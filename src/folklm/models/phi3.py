"""Phi-3 / Phi-3.5 / Phi-4 (dense): the Llama block with fused projections.

Phi-3 Technical Report (Abdin et al., 2024, arXiv:2404.14219). The architecture is Llama's
(pre-norm RMSNorm, SwiGLU, RoPE, GQA for the larger sizes) with two weights stored fused:
``self_attn.qkv_proj`` (rows: all query heads, then key heads, then value heads) and
``mlp.gate_up_proj`` (rows: gate, then up). The long-context variants use ``longrope``
(``su``) RoPE scaling (``ops/rope.py``); Phi-3-mini-4k's ``sliding_window`` applies to every
layer. Names are Hugging Face's (``Phi3ForCausalLM``), which is also how PEFT addresses the
fused layers.
"""

from __future__ import annotations

from torch import nn

from folklm.config import ModelConfig
from folklm.models.llama import MLP, Attention, CausalLM, DecoderLayer


class Phi3Attention(Attention):
    """Attention whose q/k/v live in one ``qkv_proj`` (the slot the base class reads)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        del self.q_proj, self.k_proj, self.v_proj
        rows = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, rows, bias=False)


class Phi3MLP(MLP):
    """SwiGLU whose gate and up projections live in one ``gate_up_proj`` (gate first)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        del self.gate_proj, self.up_proj
        C, F_ = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Linear(C, 2 * F_, bias=False)


def make_layer(config: ModelConfig, layer_idx: int) -> DecoderLayer:
    return DecoderLayer(config, layer_idx, Phi3MLP(config), attn=Phi3Attention(config, layer_idx))


def build(config: ModelConfig) -> CausalLM:
    return CausalLM(config, make_layer)

"""Qwen3 (dense): the Llama block with per-head RMS norms on queries and keys.

Qwen3 Technical Report (Qwen Team, 2025, arXiv:2505.09388). Against Qwen2, the q/k/v biases
are gone and each head's queries and keys are RMS-normed (``q_norm``, ``k_norm`` of size
``head_dim``) before the rotation, which keeps attention logits bounded in training. Head
size is explicit (``head_dim`` 128 for every size, not ``hidden_size / heads``). Names are
Hugging Face's (``Qwen3ForCausalLM``).
"""

from __future__ import annotations

from folklm.config import ModelConfig
from folklm.models.llama import CausalLM, DecoderLayer, QKNormAttention


def make_layer(config: ModelConfig, layer_idx: int) -> DecoderLayer:
    return DecoderLayer(config, layer_idx, attn=QKNormAttention(config, layer_idx))


def build(config: ModelConfig) -> CausalLM:
    return CausalLM(config, make_layer)

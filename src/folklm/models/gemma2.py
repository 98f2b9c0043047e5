"""Gemma 2: sandwich norms, alternating local/global attention, tanh soft-capping.

Gemma 2 (Gemma Team, 2024, arXiv:2408.00118). The block of ``models/gemma3.py`` (norms that
scale by ``1 + weight``, a norm before and after attention and feed-forward, embeddings
scaled by ``sqrt(hidden_size)``, GeGLU, queries scaled by ``query_pre_attn_scalar ** -0.5``)
without q/k norms and with one RoPE base; in addition, attention scores are capped at
``attn_logit_softcapping * tanh(s / attn_logit_softcapping)`` (50) and the final logits the
same way (``final_logit_softcapping``, 30). Even layers attend within ``sliding_window``
(4096), odd layers globally. Names are Hugging Face's (``Gemma2ForCausalLM``).
"""

from __future__ import annotations

from folklm.config import ModelConfig
from folklm.models.gemma3 import GemmaCausalLM
from folklm.models.llama import Attention, CausalLM


def build(config: ModelConfig) -> CausalLM:
    return GemmaCausalLM(config, Attention)

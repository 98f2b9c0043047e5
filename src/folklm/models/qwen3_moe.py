"""Qwen3-MoE: the Qwen3 block (q/k norms) with a sparse mixture-of-experts feed-forward.

Qwen3 Technical Report (Qwen Team, 2025, arXiv:2505.09388). Each token's router scores
``num_experts`` SwiGLU experts of width ``moe_intermediate_size`` and keeps the top
``num_experts_per_tok``; their softmax weights are renormalised only when ``norm_topk_prob``
(true for the released models). Layers listed in ``mlp_only_layers``, or not on the
``decoder_sparse_step`` stride, keep a dense feed-forward of ``intermediate_size``. Names
are Hugging Face's (``Qwen3MoeForCausalLM``): ``mlp.gate`` (router) and
``mlp.experts.E.gate_proj/up_proj/down_proj``.
"""

from __future__ import annotations

from torch import nn

from folklm.config import ModelConfig
from folklm.errors import ConfigError
from folklm.models.llama import MLP, CausalLM, DecoderLayer, QKNormAttention
from folklm.models.mixtral import SparseMoE


def is_sparse(config: ModelConfig, layer_idx: int) -> bool:
    step = int(config.extra.get("decoder_sparse_step", 1) or 1)
    dense = config.extra.get("mlp_only_layers") or []
    return layer_idx not in dense and (layer_idx + 1) % step == 0


def make_layer(config: ModelConfig, layer_idx: int) -> DecoderLayer:
    mlp: nn.Module
    if is_sparse(config, layer_idx):
        # transformers 5 writes num_local_experts; the released config.json, num_experts
        n_experts = config.num_local_experts or config.extra.get("num_experts")
        width = config.extra.get("moe_intermediate_size")
        if not (n_experts and width and config.num_experts_per_tok):
            raise ConfigError(
                "qwen3_moe config needs num_experts, moe_intermediate_size and num_experts_per_tok"
            )
        mlp = SparseMoE(
            config,
            int(n_experts),
            lambda cfg: MLP(cfg, int(width)),
            bool(config.extra.get("norm_topk_prob", False)),
        )
    else:
        mlp = MLP(config)
    return DecoderLayer(config, layer_idx, mlp, attn=QKNormAttention(config, layer_idx))


def build(config: ModelConfig) -> CausalLM:
    return CausalLM(config, make_layer)

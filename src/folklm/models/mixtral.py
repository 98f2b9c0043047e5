"""Mixtral: the Mistral block with a sparse mixture-of-experts feed-forward.

Mixtral of Experts (Jiang et al., 2024, arXiv:2401.04088): each token's router scores
``num_local_experts`` SwiGLU experts, keeps the top ``num_experts_per_tok`` (k = 2),
renormalises their softmax weights to sum to one, and sums the weighted expert outputs.
Names follow the Hugging Face checkpoint: ``block_sparse_moe.gate`` (router) and
``block_sparse_moe.experts.E.w1/w2/w3`` (gate, down, up projections).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from folklm.config import ModelConfig
from folklm.errors import ConfigError
from folklm.models.llama import CausalLM, DecoderLayer


class Expert(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        C, F_ = config.hidden_size, config.intermediate_size
        self.w1 = nn.Linear(C, F_, bias=False)  # gate
        self.w2 = nn.Linear(F_, C, bias=False)  # down
        self.w3 = nn.Linear(C, F_, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Top-k routing over ``n_experts`` feed-forwards; the kept softmax weights are
    renormalised to sum to one when ``normalize`` (Mixtral always; Qwen3-MoE per config)."""

    def __init__(
        self,
        config: ModelConfig,
        n_experts: int | None = None,
        make_expert: Callable[[ModelConfig], nn.Module] = Expert,
        normalize: bool = True,
    ):
        super().__init__()
        n_experts, top_k = n_experts or config.num_local_experts, config.num_experts_per_tok
        if not (n_experts and top_k):  # ModelConfig checks this for model_type "mixtral"
            raise ConfigError("mixtral config needs num_local_experts and num_experts_per_tok")
        self.top_k = top_k
        self.normalize = normalize
        self.gate = nn.Linear(config.hidden_size, n_experts, bias=False)
        self.experts = nn.ModuleList(make_expert(config) for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C): route every token independently
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            token_idx, slot = (chosen == e).nonzero(as_tuple=True)  # tokens routed to e
            y = self.experts[e](x[token_idx]) * weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y)
        return out.view(B, T, C)


def build(config: ModelConfig) -> CausalLM:
    return CausalLM(
        config, make_layer=lambda cfg, i: DecoderLayer(cfg, i, SparseMoE(cfg), "block_sparse_moe")
    )

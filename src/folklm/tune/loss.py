"""Training losses: next-token cross-entropy on target positions only, fused with the LM head.

The LM head of a small model is its largest matmul (SmolLM2-135M: 576 x 49152, a fifth
of the forward FLOPs), and its logits the largest activation (B x T x V floats, stored
again for the softmax backward). Two savings, both exact:

* only positions whose next token is a target go through the head (assistant-only loss
  skips the prompt);
* the head and the cross-entropy are fused in chunks (as Liger-Kernel's fused linear
  cross-entropy, Hsu et al., 2024, arXiv:2410.10989): the gradient with respect to the
  hidden states, ``(softmax(hW^T) - onehot(y)) W``, is computed in the forward pass and
  the logits are dropped, so memory is O(N x C) instead of O(N x V).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from folklm.kernels.base import QuantizedLinear
from folklm.models.llama import CausalLM
from folklm.tune.data import IGNORE

CHUNK_ROWS = 512


class _LinearCE(torch.autograd.Function):
    """Per-row ``-log softmax(h W^T)[y]``; the gradient of a frozen or uniformly weighted
    head is pre-computed in forward (see the module doc)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, W: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        N = h.shape[0]
        losses = torch.empty(N, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        grad_W = (
            torch.zeros(W.shape, dtype=torch.float32, device=W.device)
            if ctx.needs_input_grad[1]
            else None
        )
        for s in range(0, N, CHUNK_ROWS):
            hc, yc = h[s : s + CHUNK_ROWS], y[s : s + CHUNK_ROWS]
            logits = (hc @ W.T).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)
            losses[s : s + CHUNK_ROWS] = lse - logits.gather(1, yc[:, None]).squeeze(1)
            if grad_h is None and grad_W is None:
                continue
            p = torch.exp_(logits.sub_(lse[:, None]))  # softmax, in place: (n, V)
            p[torch.arange(p.shape[0]), yc] -= 1
            if grad_h is not None:
                grad_h[s : s + CHUNK_ROWS] = (p.to(W.dtype) @ W).to(h.dtype)
            if grad_W is not None:
                grad_W += p.T @ hc.float()
        ctx.w_dtype = W.dtype
        ctx.save_for_backward(grad_h, grad_W)
        return losses

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_W = ctx.saved_tensors
        gh = gW = None
        if grad_h is not None and ctx.needs_input_grad[0]:
            gh = grad_h * grad_out[:, None].to(grad_h.dtype)
        if grad_W is not None:
            if not torch.all(grad_out == grad_out[0]):
                raise RuntimeError("a trainable LM head needs a uniformly weighted loss")
            gW = (grad_W * grad_out[0]).to(ctx.w_dtype)
        return gh, gW, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy of ``h @ weight.T`` against ``y``: (N, C), (V, C), (N,) -> (N,)."""
    return _LinearCE.apply(h, weight, y)


def hidden_states(model: CausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states (B, T, C) of a folklm causal LM, no KV cache (training)."""
    return model.hidden_states(input_ids)


def head_weight(model: CausalLM) -> torch.Tensor:
    head: nn.Module = model.lm_head  # an nn.Linear, or a QuantizedLinear swapped in
    if hasattr(head, "weight") and isinstance(head.weight, torch.Tensor):
        return head.weight
    return cast(QuantizedLinear, head).dequantize(torch.float32)  # a quantized head (frozen)


def token_losses(model: CausalLM, input_ids: torch.Tensor, labels: torch.Tensor):
    """Cross-entropy (N,) of every target position and its (row, col) indices.

    ``labels`` (B, T) holds the token to predict at the same position (``IGNORE`` = none);
    position t is scored on ``labels[:, t+1]`` given tokens ``<= t``.
    """
    h = hidden_states(model, input_ids)[:, :-1]  # (B, T-1, C)
    target = labels[:, 1:]
    sel = target != IGNORE  # (B, T-1)
    rows = h[sel]  # (N, C)
    return linear_cross_entropy(rows, head_weight(model), target[sel]), sel


class CausalLMLoss(nn.Module):
    """``model`` plus its loss, so that DDP/FSDP wrap one ``forward`` that returns it."""

    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy over the target tokens of the batch."""
        losses, _ = token_losses(self.model, input_ids, labels)
        return losses.sum()


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (T - len(s)) for s in seqs], dtype=torch.long)


class SFTTask:
    """Supervised fine-tuning: summed cross-entropy of the target tokens (right padding, so
    causal attention never reaches a pad key from a real query)."""

    def __init__(self, pad_id: int = 0, eval_batch_size: int = 8):
        self.pad_id, self.eval_batch_size = pad_id, eval_batch_size

    def module(self, model: CausalLM) -> nn.Module:
        return CausalLMLoss(model)

    def collate(self, examples) -> dict[str, torch.Tensor]:
        return {
            "input_ids": pad_right([e.input_ids for e in examples], self.pad_id),
            "labels": pad_right([e.labels for e in examples], IGNORE),
        }

    def units(self, batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def tokens(self, examples) -> int:
        return sum(len(e.input_ids) for e in examples)

    @torch.no_grad()
    def evaluate(self, model: CausalLM, examples) -> dict[str, float]:
        """Mean cross-entropy per target token over ``examples``."""
        was = model.training
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(examples), self.eval_batch_size):
            batch = self.collate(examples[i : i + self.eval_batch_size])
            losses, _ = token_losses(model, batch["input_ids"], batch["labels"])
            total += losses.double().sum().item()
            count += losses.numel()
        model.train(was)
        return {"eval_loss": total / max(1, count)}

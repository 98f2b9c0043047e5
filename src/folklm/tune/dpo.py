"""Direct Preference Optimization (Rafailov et al., 2023, arXiv:2305.18290).

For a prompt x with a preferred answer y_w and a rejected one y_l, the sigmoid loss (eq. 7)
is ``-log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))``
where ``log pi(y|x)`` sums the log-probabilities of the answer's tokens. The policy is the
base model with a LoRA adapter; the frozen reference is the same model with the adapter
switched off (no second copy in memory). The bracket is the *preference margin*: it starts
at 0 (the adapter's B is zero) and should grow on held-out pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from folklm.models.llama import CausalLM
from folklm.tune.data import IGNORE, PreferenceExample
from folklm.tune.lora import lora_layers, set_adapters_enabled
from folklm.tune.loss import pad_right, token_losses


def sequence_logps(model: CausalLM, input_ids: torch.Tensor, labels: torch.Tensor):
    """Sum of log p(target token) per row: (B, T) -> (B,)."""
    losses, sel = token_losses(model, input_ids, labels)
    rows = sel.nonzero()[:, 0]
    return torch.zeros(input_ids.shape[0], dtype=losses.dtype).index_add(0, rows, -losses)


@contextmanager
def adapters_disabled(model: nn.Module):
    set_adapters_enabled(model, False)
    try:
        yield
    finally:
        set_adapters_enabled(model, True)


def dpo_terms(model: CausalLM, input_ids, labels, beta: float):
    """(per-pair losses, margins) for a batch whose first half is chosen, second rejected."""
    policy = sequence_logps(model, input_ids, labels)
    with torch.no_grad(), adapters_disabled(model):
        ref = sequence_logps(model, input_ids, labels)
    n = input_ids.shape[0] // 2
    ratio = policy - ref  # (2n,)
    margin = ratio[:n] - ratio[n:]
    return -F.logsigmoid(beta * margin), margin


class DPOLoss(nn.Module):
    def __init__(self, model: CausalLM, beta: float):
        super().__init__()
        self.model, self.beta = model, beta

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses, _ = dpo_terms(self.model, input_ids, labels, self.beta)
        return losses.sum()


class DPOTask:
    """Preference pairs -> the DPO loss (units: pairs)."""

    def __init__(self, beta: float, pad_id: int = 0, eval_batch_size: int = 4):
        self.beta, self.pad_id, self.eval_batch_size = beta, pad_id, eval_batch_size

    def module(self, model: CausalLM) -> nn.Module:
        if not any(True for _ in lora_layers(model)):
            raise ValueError("DPO here needs a LoRA adapter (the reference is the base)")
        return DPOLoss(model, self.beta)

    def collate(self, examples: Sequence[PreferenceExample]) -> dict[str, torch.Tensor]:
        seqs, labels = [], []
        for answer in ("chosen_ids", "rejected_ids"):
            for e in examples:
                a = getattr(e, answer)
                seqs.append(e.prompt_ids + a)
                labels.append([IGNORE] * len(e.prompt_ids) + a)
        return {"input_ids": pad_right(seqs, self.pad_id), "labels": pad_right(labels, IGNORE)}

    def units(self, batch) -> int:
        return batch["input_ids"].shape[0] // 2

    def tokens(self, examples) -> int:
        return sum(
            2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples
        )

    @torch.no_grad()
    def evaluate(self, model: CausalLM, examples) -> dict[str, float]:
        """Mean DPO loss, preference margin and reward accuracy (margin > 0) of ``examples``."""
        was = model.training
        model.eval()
        losses, margins = [], []
        for i in range(0, len(examples), self.eval_batch_size):
            b = self.collate(examples[i : i + self.eval_batch_size])
            loss, margin = dpo_terms(model, b["input_ids"], b["labels"], self.beta)
            losses.append(loss)
            margins.append(margin)
        model.train(was)
        loss, margin = torch.cat(losses), torch.cat(margins)
        return {
            "eval_loss": loss.mean().item(),
            "eval_margin": margin.mean().item(),
            "eval_accuracy": (margin > 0).double().mean().item(),
        }

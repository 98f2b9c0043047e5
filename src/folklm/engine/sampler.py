"""The sampler every decoding path uses: a chain of logits processors, then a token choice.

Processors run in this order (the transformers order for the options it has, see
``ops.sampling``): repetition penalty over prompt + output, OpenAI presence/frequency
penalties over the output, an output constraint (a boolean mask over the vocabulary, e.g.
a JSON schema), then the warpers temperature, top-k, top-p and min-p. Greedy takes the
arg-max of the processed scores; otherwise one draw per row from their softmax with the
sequence's own generator, so a seeded run gives the same tokens whatever else is batched.
Log-probabilities are those of the model's distribution before any processor, as the
OpenAI API reports them. To add an option: a field (and its check) in ``SamplingParams``,
one processor here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from folklm.ops.sampling import (
    SamplingParams,
    apply_presence_frequency,
    apply_repetition_penalty,
    filter_logits,
)

LogitsProcessor = Callable[[torch.Tensor], torch.Tensor]  # (B, V) scores -> (B, V) scores


class Constraint(Protocol):
    """An output constraint (``engine.constrained.GrammarConstraint``): a state machine."""

    def start(self) -> Any: ...
    def allowed(self, state: Any) -> torch.Tensor: ...  # (V,) bool
    def advance(self, state: Any, token: int) -> Any: ...
    def done(self, state: Any) -> bool: ...


class Sampler:
    """Picks the next token of each of B rows that share one ``SamplingParams``.

    Args:
        params: the sampling options (validated here).
        history: (B, L) token ids already in each row (the prompt), for the repetition
            penalty.
        vocab_size: V, for the presence/frequency counts.
        generator: the random generator of the draws (None: torch's default).
        constraint: an optional output constraint, one state per row.
    """

    def __init__(
        self,
        params: SamplingParams,
        history: torch.Tensor,
        vocab_size: int,
        generator: torch.Generator | None = None,
        constraint: Constraint | None = None,
    ):
        self.params = params.validate()
        self.generator = generator
        B = history.shape[0]
        self.seen = history if params.repetition_penalty != 1.0 else None
        self.counts: torch.Tensor | None = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(B, vocab_size)
        self.constraint = constraint
        self.states = [constraint.start() for _ in range(B)] if constraint is not None else []
        self.processors = self._processors()

    def _processors(self) -> list[LogitsProcessor]:
        p = self.params
        out: list[LogitsProcessor] = []
        if self.seen is not None:
            out.append(self._repetition)
        if self.counts is not None:
            out.append(self._presence_frequency)
        if self.constraint is not None:
            out.append(self._constrain)
        if not p.greedy:
            out.append(lambda x: filter_logits(x, p))
        return out

    # The processors read the state as it is at each step (``accept`` replaces ``seen``).
    def _repetition(self, scores: torch.Tensor) -> torch.Tensor:
        assert self.seen is not None  # installed only with a repetition penalty
        return apply_repetition_penalty(scores, self.seen, self.params.repetition_penalty)

    def _presence_frequency(self, scores: torch.Tensor) -> torch.Tensor:
        assert self.counts is not None  # installed only with a presence/frequency penalty
        p = self.params
        return apply_presence_frequency(
            scores, self.counts, p.presence_penalty, p.frequency_penalty
        )

    def _constrain(self, scores: torch.Tensor) -> torch.Tensor:
        constraint = self.constraint
        assert constraint is not None  # installed only with a constraint
        allowed = torch.stack([constraint.allowed(s) for s in self.states])  # (B, V)
        return scores.masked_fill(~allowed, float("-inf"))

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) float32 logits -> (B,) int64 tokens."""
        scores = logits
        for process in self.processors:
            scores = process(scores)
        if self.params.greedy:
            return scores.argmax(dim=-1)
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)

    def accept(self, tokens: torch.Tensor) -> None:
        """Record the chosen tokens (B,) in the penalties' and the constraint's state."""
        if self.seen is not None:
            self.seen = torch.cat([self.seen, tokens[:, None]], dim=1)
        if self.counts is not None:
            self.counts[torch.arange(len(tokens)), tokens] += 1
        if self.constraint is not None:
            pairs = zip(self.states, tokens.tolist(), strict=True)
            self.states = [self.constraint.advance(s, t) for s, t in pairs]

    def constraint_done(self, row: int) -> bool:
        return self.constraint is not None and self.constraint.done(self.states[row])

    def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> list[dict] | None:
        """Per row: the chosen token's logprob and the top ``params.logprobs`` (id, logprob)."""
        k = self.params.logprobs
        if k is None:
            return None
        lp = logits.log_softmax(dim=-1)  # (B, V)
        return [
            {"logprob": float(lp[b, t]), "top": top_logprobs(lp[b], k)}
            for b, t in enumerate(tokens.tolist())
        ]


def top_logprobs(lp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, logprob) pairs of a (V,) log-distribution."""
    if k <= 0:
        return []
    values, ids = lp.topk(k)
    return list(zip(ids.tolist(), values.tolist(), strict=True))

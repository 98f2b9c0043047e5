"""Next-token selection: the sampling options, their validation and the logits maths.

Applied in the order transformers applies them, so a seeded folklm run and a seeded
transformers run filter the same candidates: repetition penalty (Keskar et al., 2019,
arXiv:1909.05858: positive logits of seen tokens divided by the penalty, negative ones
multiplied), temperature, top-k, top-p (Holtzman et al., 2019, arXiv:1904.09751), min-p
(Nguyen et al., 2024, arXiv:2407.01082: drop tokens below ``min_p`` x the top probability).
The OpenAI presence/frequency penalties (``logit -= presence * [count > 0] + frequency *
count`` over the tokens generated so far, as the OpenAI API reference defines them) come
right after the repetition penalty. ``engine.sampler`` chains these as logits processors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from folklm.errors import FolkError

# the options that shape the next-token distribution, by their ``SamplingParams`` names
# (front doors copy them by name from their own request objects)
DISTRIBUTION_OPTIONS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature=0`` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: the chosen token's and the top-k logprobs

    def validate(self) -> SamplingParams:
        numbers = (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        )
        for name in numbers:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FolkError(f"{name}={value!r} is invalid: expected a number")
        checks = [
            (
                isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
                "max_new_tokens",
                "a whole number >= 0",
            ),
            (self.temperature >= 0, "temperature", ">= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "a whole number >= 0"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (0 <= self.min_p < 1, "min_p", "in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty", "> 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]"),
            (
                self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
                "logprobs",
                "None or a whole number >= 0",
            ),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise FolkError(f"{name}={getattr(self, name)!r} is invalid: expected {expected}")
        # a bare string would pass as a list of one-character stop strings
        if not isinstance(self.stop, (list, tuple)) or any(
            not isinstance(s, str) or not s for s in self.stop
        ):
            raise FolkError(f"stop={self.stop!r} is invalid: expected a list of non-empty strings")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """logits (B, V); seen (B, L) token ids already in each row (prompt + output)."""
    scores = logits.gather(1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, seen, scores)


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """logits (B, V); counts (B, V) float, how often each token was generated in each row."""
    return logits - presence * (counts > 0) - frequency * counts


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on (B, V) float32 logits; removed = -inf."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1 - p.top_p)
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(dim=-1)
        threshold = p.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def select(
    logits: torch.Tensor,
    p: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits (B, V) -> (B,) int64."""
    if p.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)

"""One request to the serving engine: its prompt, options, sink for events, and state flags.

Kept apart from ``engine.scheduler`` so that the output processor, the server and the
scheduler all name the same type without importing each other.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from folklm.engine.sampler import Constraint
from folklm.errors import FolkError
from folklm.ops.sampling import DISTRIBUTION_OPTIONS, SamplingParams

# fields of a ``Request`` that are the ``SamplingParams`` field of the same name
SAMPLING_OPTIONS = (*DISTRIBUTION_OPTIONS, "ignore_eos", "logprobs")


class QueueFull(FolkError):
    """The waiting queue is at its limit; retry later."""


@dataclass
class Request:
    """One completion to generate. ``sink`` receives the events (from the engine thread)."""

    prompt: list[int]
    max_tokens: int
    sink: Callable[[dict[str, Any]], None]
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; k: the chosen token's and the top-k logprobs
    echo_logprobs: bool = False  # logprobs of the prompt tokens too (completions echo)
    adapter: str | None = None
    constraint: Constraint | None = None  # e.g. ``engine.constrained.GrammarConstraint``
    ignore_eos: bool = False
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    arrival: float = field(default_factory=time.perf_counter)

    def sampling(self) -> SamplingParams:
        """The request's options as ``SamplingParams`` (validated)."""
        options = {name: getattr(self, name) for name in SAMPLING_OPTIONS}
        return SamplingParams(
            max_new_tokens=self.max_tokens, stop=list(self.stop), seed=self.seed, **options
        ).validate()

"""The server engine's output processor: logits in, token events and metrics out.

For each running sequence it holds the decoding core's per-sequence parts -- a ``Sampler``
(the request's options, its own seeded generator) and a ``TextStream`` (text deltas, stop
strings, the finish) -- and turns each step's logits into one ``token`` event for the
request's sink, then a ``finish`` event with the token counts. It also keeps the
counters and latency observations that the server exports as metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from folklm.engine.request import Request
from folklm.engine.sampler import Sampler, top_logprobs
from folklm.engine.text import TextStream
from folklm.tokenizer import Tokenizer


@dataclass
class Sequence:
    """A running request: its slot, adapter, sampler, text stream and generated tokens."""

    req: Request
    slot: int
    adapter: int  # MultiLoRA index (0 = base)
    sampler: Sampler
    stream: TextStream
    generated: list[int] = field(default_factory=list)
    next_token: int = -1
    first_token_at: float = 0.0


class OutputProcessor:
    """Samples, detokenizes and reports for the engine's sequences.

    Args:
        tokenizer: the model's tokenizer.
        eos: end-of-sequence ids.
        vocab_size: the model's vocabulary size.
        stats: the engine's counters (updated in place).
        observers: callbacks ``(histogram name, value)``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        eos: set[int],
        vocab_size: int,
        stats: dict[str, float],
        observers: list[Callable[[str, float], None]],
    ):
        self.tokenizer = tokenizer
        self.eos = eos
        self.vocab_size = vocab_size
        self.stats = stats
        self.observers = observers
        self._rng = torch.Generator().manual_seed(int(time.time_ns() % (1 << 62)))

    def new_sequence(self, req: Request, slot: int, adapter: int) -> Sequence:
        params = req.sampling()
        generator = None
        if not params.greedy:
            seed = params.seed
            if seed is None:
                seed = int(torch.randint(1 << 62, (1,), generator=self._rng))
            generator = torch.Generator().manual_seed(seed)
        history = torch.tensor([req.prompt], dtype=torch.long)  # (1, n)
        sampler = Sampler(params, history, self.vocab_size, generator, req.constraint)
        stream = TextStream(
            self.tokenizer, params.stop, self.eos, params.max_new_tokens, params.ignore_eos
        )
        return Sequence(req, slot, adapter, sampler, stream)

    def emit(self, seq: Sequence, logits: torch.Tensor) -> str | None:
        """Pick the next token from ``logits`` (1, V) and send its text; return the finish
        reason when the sequence is over."""
        token_t = seq.sampler.sample(logits)  # (1,)
        seq.sampler.accept(token_t)
        info = seq.sampler.logprobs(logits, token_t)
        token = int(token_t[0])
        now = time.perf_counter()
        if not seq.generated:
            seq.first_token_at = now
            for o in self.observers:
                o("time_to_first_token_seconds", now - seq.req.arrival)
        seq.generated.append(token)
        self.stats["generation_tokens_total"] += 1
        text = seq.stream.push(token, seq.sampler.constraint_done(0))
        seq.req.sink(
            {
                "type": "token",
                "text": text,
                "token": token,
                "logprobs": info[0] if info is not None else None,
                "eos": seq.stream.ended_by_eos,
            }
        )
        seq.next_token = token
        return seq.stream.finish_reason

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """Count the request as finished and send its ``finish`` event."""
        self.stats["requests_finished_total"] += 1
        now = time.perf_counter()
        for o in self.observers:
            o("request_latency_seconds", now - seq.req.arrival)
            if len(seq.generated) > 1:
                o(
                    "inter_token_latency_seconds",
                    (now - seq.first_token_at) / (len(seq.generated) - 1),
                )
        seq.req.sink(
            {
                "type": "finish",
                "finish_reason": reason,
                "prompt_tokens": len(seq.req.prompt),
                "completion_tokens": len(seq.generated),
                "error": error,
            }
        )


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> list[dict[str, Any]]:
    """Per prompt token: its logprob given the tokens before (None for the first) and the
    top k alternatives there. ``logits`` (T, V) from a full-prompt forward pass."""
    lp = logits.log_softmax(dim=-1)  # (T, V): row t predicts token t + 1
    out: list[dict[str, Any]] = [{"token": prompt[0], "logprob": None, "top": []}]
    for t in range(1, len(prompt)):
        tok = prompt[t]
        out.append(
            {"token": tok, "logprob": float(lp[t - 1, tok]), "top": top_logprobs(lp[t - 1], k)}
        )
    return out

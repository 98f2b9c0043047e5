"""Autoregressive generation: prefill once, then one-token decode steps over a static cache.

Prompts of different lengths share a batch through left padding: every row writes the same
cache slot at each step and padding slots are masked out. ``generate_stream`` yields, per
decode step, the new text of every row, decoded incrementally so a multi-byte character
split over several tokens is only emitted once complete, and held back while it could
still turn out to be the start of a stop string.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from folklm.cache import KVCache
from folklm.errors import FolkError
from folklm.ops.sampling import SamplingParams, select
from folklm.tokenizer import Tokenizer


@dataclass
class Completion:
    """One row's result. ``finish_reason``: "stop" (EOS or stop string) or "length"."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str | None = None


@dataclass
class Timings:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prompt_tokens: int = 0
    decode_steps: int = 0  # forward passes after prefill
    decode_tokens: int = 0  # tokens those passes produced for unfinished rows
    generated_tokens: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        """Tokens per second of the decode steps alone (forward + sampling)."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without breaking UTF-8.

    Decoding token by token would split multi-byte characters (byte-level BPE spreads an
    emoji over several tokens) and lose SentencePiece's leading-space rules, so each step
    decodes a short window of recent tokens and emits only the part after the previous
    window's text, and nothing while the text ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids before this are already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prev = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        if len(text) > len(prev) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(prev) :]
        return ""

    def flush(self) -> str:
        """The held-back rest at the end of a run, even an incomplete character (U+FFFD),
        so that the streamed text always equals ``decode(all ids)``."""
        prev = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(prev) :] if len(text) > len(prev) else ""


class StopMatcher:
    """Finds stop strings in streamed text and holds back text that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        self.pending += delta
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        # Cut at the stop string that is complete first (earliest end; the longest if several end
        # there), as if the text had come one character at a time: the result must not depend
        # on how the text was split into deltas (stops "abcd" and "bc" over "abc" + "d").
        hits = [(i + len(s), i) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            _, cut = min(hits)
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0  # longest suffix of pending that is a prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p) :] = True
    return ids, mask


def generate_stream(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_ids: list[int],
    timings: Timings | None = None,
) -> Iterator[list[tuple[int, str, Completion]]]:
    """Generate for a batch; yield after each step a list of (row, new text, completion).

    The final state of every row is in the ``Completion`` objects, which are updated in
    place (text, token_ids, finish_reason).
    """
    params.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise FolkError("empty prompt: give at least one token of input")
    config = model.config
    B = len(prompts)
    max_prompt = max(len(p) for p in prompts)
    ctx = config.max_position_embeddings
    if max_prompt + params.max_new_tokens > ctx:
        raise FolkError(
            f"prompt ({max_prompt} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
            f"the model's context of {ctx} tokens"
        )
    timings = timings if timings is not None else Timings()
    results = [Completion(prompt_tokens=len(p)) for p in prompts]
    if params.max_new_tokens == 0:
        for r in results:
            r.finish_reason = "length"
        return
    dtype = next(model.parameters()).dtype
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    ids, prompt_mask = _left_pad(prompts, tokenizer.pad_token_id or 0)
    cache = KVCache(config, B, max_prompt + params.max_new_tokens, dtype)
    n_pad = (~prompt_mask).sum(dim=1)  # (B,)
    if bool(n_pad.any()):
        cache.pad_mask = torch.ones((B, cache.max_len), dtype=torch.bool)
        cache.pad_mask[:, :max_prompt] = prompt_mask
    positions = (torch.arange(max_prompt)[None, :] - n_pad[:, None]).clamp(min=0)
    seen = ids if params.repetition_penalty != 1.0 else None
    eos = torch.tensor(sorted(set(eos_ids)) if not params.ignore_eos else [], dtype=torch.long)
    detok = [IncrementalDetokenizer(tokenizer) for _ in range(B)]
    stops = [StopMatcher(params.stop) for _ in range(B)]
    done = [False] * B

    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(ids, cache=cache, position_ids=positions, last_only=True)[:, -1]
        token = select(logits, params, generator, seen)  # (B,)
        timings.prefill_seconds += time.perf_counter() - t0
        timings.prompt_tokens += int(prompt_mask.sum())
        for step in range(params.max_new_tokens):
            tokens = token.tolist()
            is_eos = torch.isin(token, eos).tolist() if len(eos) else [False] * B
            events = []
            for b in range(B):
                if done[b]:
                    continue
                res = results[b]
                timings.generated_tokens += 1
                if is_eos[b]:
                    res.token_ids.append(tokens[b])
                    more, hit = stops[b].feed(detok[b].flush())
                    tail = more + ("" if hit else stops[b].flush())
                    res.text += tail
                    res.finish_reason, done[b] = "stop", True
                    events.append((b, tail, res))
                    continue
                res.token_ids.append(tokens[b])
                out, hit = stops[b].feed(detok[b].push(tokens[b]))
                res.text += out
                if hit:
                    res.finish_reason, done[b] = "stop", True
                elif step == params.max_new_tokens - 1:
                    more, hit = stops[b].feed(detok[b].flush())
                    tail = more + ("" if hit else stops[b].flush())
                    out += tail
                    res.text += tail
                    res.finish_reason, done[b] = ("stop" if hit else "length"), True
                events.append((b, out, res))
            yield events
            if all(done):
                break
            if seen is not None:
                seen = torch.cat([seen, token[:, None]], dim=1)
            t0 = time.perf_counter()
            pos = (cache.length - n_pad)[:, None]  # (B, 1)
            logits = model(token[:, None], cache=cache, position_ids=pos, last_only=True)[:, -1]
            token = select(logits, params, generator, seen)
            timings.decode_seconds += time.perf_counter() - t0
            timings.decode_steps += 1
            timings.decode_tokens += B - sum(done)


def generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_ids: list[int],
    timings: Timings | None = None,
) -> list[Completion]:
    """Run ``generate_stream`` to the end and return each row's completion."""
    results: dict[int, Completion] = {}
    for events in generate_stream(model, tokenizer, prompts, params, eos_ids, timings):
        for b, _, res in events:
            results[b] = res
    if not results:  # max_new_tokens == 0
        return [Completion(prompt_tokens=len(p), finish_reason="length") for p in prompts]
    return [results[b] for b in range(len(prompts))]

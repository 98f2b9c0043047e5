"""Continuous batching: requests join and leave the running batch at every decode step.

Iteration-level scheduling (Orca, Yu et al., OSDI 2022): one engine thread loops over
(1) admitting waiting requests -- each gets a KV slot and is prefilled on its own, its
first token sampled at once -- and (2) one decode step in which every running sequence
advances by one token, whatever its length or arrival time. A sequence that finishes (EOS,
stop string, length) or whose client went away leaves the batch and frees its slot before
the next step; a new one takes the place. Each request keeps its own sampling settings,
random generator, adapter and output constraint, so mixed requests share a step.

The queue in front is bounded: ``submit`` raises ``QueueFull`` when it is full (the
server answers 429 with ``Retry-After``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from folklm.engine.batch_ops import build_decode_masks, pick_token, prompt_logprobs
from folklm.engine.generate import IncrementalDetokenizer, StopMatcher
from folklm.engine.slots import SlotCache
from folklm.errors import FolkError


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; k: the chosen token's and the top-k logprobs
    echo_logprobs: bool = False  # logprobs of the prompt tokens too (completions echo)
    adapter: str | None = None
    constraint: Any = None  # an object with start()/allowed(state)/advance(state, id)/done()
    ignore_eos: bool = False
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    arrival: float = field(default_factory=time.perf_counter)


@dataclass
class _Seq:
    req: Request
    slot: int
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    stops: StopMatcher
    counts: torch.Tensor | None  # (V,) generated-token counts, for the OpenAI penalties
    state: Any = None  # constraint state
    generated: list[int] = field(default_factory=list)
    next_token: int = -1
    first_token_at: float = 0.0


class Engine:
    """Owns the model, the slot cache and the engine thread.

    Args:
        llm: a loaded ``LLM`` (model, tokenizer, EOS ids).
        max_batch: most sequences decoding together (slots).
        max_queue: most requests waiting for a slot before ``QueueFull``.
        max_len: most tokens per sequence (default: the model's context).
        kv_budget_bytes: memory budget of the KV cache.
        lora: an optional ``MultiLoRA`` (per-row adapters); ``None`` serves the base only.
        keep_prefixes: cached prefixes kept when the server goes idle.
    """

    def __init__(
        self,
        llm: Any,
        max_batch: int = 16,
        max_queue: int = 256,
        max_len: int | None = None,
        kv_budget_bytes: int = 4 << 30,
        lora: Any = None,
        keep_prefixes: int = 4,
        max_prefill_tokens: int = 1024,
    ):
        self.llm = llm
        self.model = llm.model
        self.tokenizer = llm.tokenizer
        self.eos = set(llm.eos_token_ids)
        ctx = llm.config.max_position_embeddings
        self.max_len = min(ctx, max_len or ctx)
        self.max_queue = max_queue
        self.cache = SlotCache(llm.config, max_batch, self.max_len, llm.dtype, kv_budget_bytes)
        self.lora = lora
        self.keep_prefixes = keep_prefixes
        self.max_prefill_tokens = max_prefill_tokens
        self.vocab = llm.config.vocab_size
        self.waiting: deque[Request] = deque()
        self.running: list[_Seq] = []
        self.jobs: deque[tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]]]
        self.jobs = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._rng = torch.Generator().manual_seed(int(time.time_ns() % (1 << 62)))
        self.stats: dict[str, float] = {
            "requests_total": 0,
            "requests_finished_total": 0,
            "requests_cancelled_total": 0,
            "prompt_tokens_total": 0,
            "generation_tokens_total": 0,
            "prefix_cached_tokens_total": 0,
            "decode_steps_total": 0,
        }
        self.observers: list[Callable[[str, float], None]] = []  # (histogram name, value)
        self._thread = threading.Thread(target=self._loop, name="folk-engine", daemon=True)
        self._thread.start()

    # -- public, thread-safe --------------------------------------------------------------
    def check_length(self, n_prompt: int, max_tokens: int) -> None:
        """Raise ``FolkError`` (a 400) when prompt + completion cannot fit a sequence."""
        if n_prompt + max_tokens > self.max_len:
            raise FolkError(
                f"this model's maximum context length is {self.max_len} tokens; the request "
                f"has {n_prompt} prompt tokens + {max_tokens} completion tokens = "
                f"{n_prompt + max_tokens}"
            )
        if not self.cache.fits(n_prompt + max_tokens):
            raise FolkError(
                f"{n_prompt + max_tokens} tokens exceed the server's KV cache budget of "
                f"{self.cache.budget_bytes // self.cache.bytes_per_token} tokens"
            )

    def submit(self, req: Request) -> Request:
        self.check_length(len(req.prompt), req.max_tokens)
        with self._cv:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self.waiting.append(req)
            self.stats["requests_total"] += 1
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (client gone): its slot is freed before the next decode step."""
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    def call(self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]):
        """Run ``fn`` on the engine thread between steps (embeddings, adapter loads)."""
        with self._cv:
            self.jobs.append((fn, done))
            self._cv.notify()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    # -- engine thread --------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not (self._stop or self.waiting or self.running or self.jobs):
                    self.cache.shrink(self.keep_prefixes)
                    self._cv.wait(timeout=1.0)
                if self._stop:
                    break
                jobs, self.jobs = list(self.jobs), deque()
            for fn, done in jobs:
                try:
                    result, error = fn(), None
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    result, error = None, exc
                done(result, error)
            try:
                with torch.inference_mode():
                    self._drop_cancelled()
                    self._admit()
                    if self.running:
                        self._decode_step()
            except Exception as exc:  # noqa: BLE001 - fail the batch, keep the server up
                for seq in list(self.running):
                    self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
        for seq in list(self.running):
            self._finish(seq, "error", error="server shutting down")

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
        self.stats["requests_cancelled_total"] += len(gone)
        for seq in [s for s in self.running if s.req.cancelled]:
            self.stats["requests_cancelled_total"] += 1
            self._release(seq)

    def _admit(self) -> None:
        budget = self.max_prefill_tokens
        while budget > 0:
            with self._cv:
                if not self.waiting:
                    return
                req = self.waiting[0]
            adapter_index = 0
            if req.adapter is not None:
                try:
                    adapter_index = self.lora.acquire(req.adapter)
                except FolkError as exc:
                    with self._cv:
                        self.waiting.popleft()
                    req.sink({"type": "finish", "finish_reason": "error", "error": str(exc)})
                    continue
                if adapter_index is None:
                    return  # every adapter slot is busy: wait for a sequence to finish
            need = len(req.prompt) + req.max_tokens
            reuse = not req.echo_logprobs
            got = self.cache.acquire(req.prompt, need, req.adapter, reuse)
            if got is None and not self.running:
                self.cache.shrink(0)  # idle buffers shaped for an earlier burst: start afresh
                got = self.cache.acquire(req.prompt, need, req.adapter, reuse)
            if got is None:
                if req.adapter is not None:
                    self.lora.release(req.adapter)
                if not self.running:  # cannot fit even alone (check_length prevents this)
                    with self._cv:
                        self.waiting.popleft()
                    req.sink({"type": "finish", "finish_reason": "error", "error": "no memory"})
                    continue
                return  # no slot or memory yet: a running sequence will free one
            with self._cv:
                self.waiting.popleft()
            slot, n_cached = got
            budget -= len(req.prompt) - n_cached
            try:
                self._prefill(req, slot, n_cached, adapter_index)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                seqs = [s for s in self.running if s.req is req]
                if seqs:
                    self._finish(seqs[0], "error", error=f"{type(exc).__name__}: {exc}")
                else:
                    self.cache.release(slot, keep=False)
                    if req.adapter is not None:
                        self.lora.release(req.adapter)
                    req.sink({"type": "finish", "finish_reason": "error", "error": str(exc)})

    def _new_seq(self, req: Request, slot: int) -> _Seq:
        gen = None
        if req.temperature > 0:
            seed = (
                req.seed
                if req.seed is not None
                else int(torch.randint(1 << 62, (1,), generator=self._rng))
            )
            gen = torch.Generator().manual_seed(seed)
        counts = None
        if req.presence_penalty or req.frequency_penalty:
            counts = torch.zeros(self.vocab)
        seq = _Seq(
            req, slot, gen, IncrementalDetokenizer(self.tokenizer), StopMatcher(req.stop), counts
        )
        if req.constraint is not None:
            seq.state = req.constraint.start()
        return seq

    def _prefill(self, req: Request, slot: int, n_cached: int, adapter_index: int) -> None:
        seq = self._new_seq(req, slot)
        n = len(req.prompt)
        self.stats["prompt_tokens_total"] += n
        self.stats["prefix_cached_tokens_total"] += n_cached
        if self.lora is not None:
            self.lora.set_rows([adapter_index])
        ids = torch.tensor([req.prompt[n_cached:]], dtype=torch.long)  # (1, T)
        pos = torch.arange(n_cached, n)[None]  # (1, T)
        view = self.cache.view(slot)
        try:
            logits = self.model(ids, cache=view, position_ids=pos, last_only=not req.echo_logprobs)
        finally:
            if self.lora is not None:
                self.lora.set_rows([])  # other callers of the model see the base
        self.cache.lengths[slot] = n
        self.cache.tokens[slot] = list(req.prompt)
        if req.echo_logprobs:
            req.sink({"type": "prompt_logprobs", "data": prompt_logprobs(logits[0], req)})
        self.running.append(seq)
        if req.max_tokens == 0:  # prompt logprobs only (completions with echo)
            return self._finish(seq, "length")
        self._emit_next(seq, logits[0, -1])

    def _decode_step(self) -> None:
        seqs = self.running
        slots = [s.slot for s in seqs]
        hi = max(slots) + 1
        top = max(self.cache.lengths[s] for s in slots)
        tokens = torch.zeros(hi, dtype=torch.long)
        positions = torch.full((hi,), top, dtype=torch.long)
        for s in seqs:
            tokens[s.slot] = s.next_token
            positions[s.slot] = self.cache.lengths[s.slot]
        for r in set(range(hi)) - set(slots):  # a hole's garbage write must not hit a prefix
            if self.cache.lengths[r] > top:
                self.cache.lengths[r] = top
                self.cache.tokens[r] = self.cache.tokens[r][:top]
        if self.lora is not None:
            rows = [0] * hi
            for s in seqs:
                rows[s.slot] = self.lora.index_of(s.req.adapter)
            self.lora.set_rows(rows)
        view = self.cache.decode_view(hi, positions)
        masks = build_decode_masks(positions, view.span, self.model.windows)
        try:
            logits = self.model(
                tokens[:, None],
                cache=view,
                position_ids=positions[:, None],
                masks=masks,
                last_only=True,
            )[:, -1]  # (hi, V)
        finally:
            if self.lora is not None:
                self.lora.set_rows([])
        self.stats["decode_steps_total"] += 1
        for o in self.observers:
            o("batch_size", float(len(seqs)))
        for s in list(seqs):
            self.cache.lengths[s.slot] += 1
            self.cache.tokens[s.slot].append(s.next_token)
            self._emit_next(s, logits[s.slot])

    def _emit_next(self, seq: _Seq, logits: torch.Tensor) -> None:
        """Pick the next token from ``logits`` (V,), send its text, finish if due."""
        req = seq.req
        token, info = pick_token(logits, seq, self.eos)
        now = time.perf_counter()
        if not seq.generated:
            seq.first_token_at = now
            for o in self.observers:
                o("time_to_first_token_seconds", now - req.arrival)
        seq.generated.append(token)
        self.stats["generation_tokens_total"] += 1
        if seq.counts is not None:
            seq.counts[token] += 1
        if token in self.eos and not req.ignore_eos:
            more, hit = seq.stops.feed(seq.detok.flush())
            text = more + ("" if hit else seq.stops.flush())
            self._send(seq, text, token, info, eos=True)
            return self._finish(seq, "stop")
        if req.constraint is not None:
            seq.state = req.constraint.advance(seq.state, token)
        text, hit = seq.stops.feed(seq.detok.push(token))
        finish = None
        if hit:
            finish = "stop"
        elif req.constraint is not None and req.constraint.done(seq.state):
            finish = "stop"
        elif len(seq.generated) >= req.max_tokens:
            finish = "length"
        if finish is not None and not hit:
            more, hit = seq.stops.feed(seq.detok.flush())
            text += more + ("" if hit else seq.stops.flush())
            finish = "stop" if hit else finish
        self._send(seq, text, token, info)
        if finish is not None:
            return self._finish(seq, finish)
        seq.next_token = token

    def _send(self, seq: _Seq, text: str, token: int, info: dict | None, eos: bool = False):
        seq.req.sink({"type": "token", "text": text, "token": token, "logprobs": info, "eos": eos})

    def _release(self, seq: _Seq) -> None:
        self.running.remove(seq)
        self.cache.release(seq.slot)
        if seq.req.adapter is not None and self.lora is not None:
            self.lora.release(seq.req.adapter)

    def _finish(self, seq: _Seq, reason: str, error: str | None = None) -> None:
        self._release(seq)
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

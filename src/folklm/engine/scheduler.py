"""Continuous batching: requests join and leave the running batch at every decode step.

Iteration-level scheduling (Orca, Yu et al., OSDI 2022): one engine thread loops over
(1) admitting waiting requests -- each gets a KV slot and is prefilled on its own, its
first token sampled at once -- and (2) one decode step in which every running sequence
advances by one token, whatever its length or arrival time. A sequence that finishes (EOS,
stop string, length) or whose client went away leaves the batch and frees its slot before
the next step; a new one takes the place. Each request keeps its own sampling settings,
random generator, adapter and output constraint, so mixed requests share a step.

Three parts, as in vLLM v1: the ``Scheduler`` (queue, admission, slots, adapter slots,
prefill budget) decides what runs; the ``ModelRunner`` (``engine.runner``) builds the
tensors and calls the model over the slot cache; the ``OutputProcessor``
(``engine.output``) samples, detokenizes and sends events. ``Engine`` owns the thread.

The queue in front is bounded: ``submit`` raises ``QueueFull`` when it is full (the
server answers 429 with ``Retry-After``).

Failure isolation: a fault in one sequence's own work -- its constraint, its sampler, its
detokenizer -- finishes that request alone with ``finish_reason: "error"``; every other
sequence of the step goes on with the same logits, so its tokens are those it would have
had alone. Only a failure of the shared model call fails the whole batch. The event's
``error`` is what a client may see: a ``FolkError``'s message (bad input, a limit), else a
generic sentence; the detail (exception type, traceback) goes to the ``folklm.engine`` log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from folklm.engine.constrained import GrammarCache, GrammarTokenizer
from folklm.engine.multilora import MultiLoRA
from folklm.engine.output import OutputProcessor, Sequence, prompt_logprobs
from folklm.engine.request import QueueFull, Request
from folklm.engine.runner import ModelRunner
from folklm.engine.slots import SlotCache
from folklm.errors import FolkError
from folklm.models.llama import CausalLM

if TYPE_CHECKING:  # pragma: no cover
    from folklm.engine.llm import LLM

log = logging.getLogger("folklm.engine")


def client_error(exc: BaseException, req: Request) -> str:
    """What a client may read about ``exc`` (no paths, no exception types); logs the rest."""
    if isinstance(exc, FolkError):
        log.info("request %d failed: %s", req.id, exc)
        return str(exc)
    log.error("request %d failed", req.id, exc_info=exc)
    return f"generation failed (request {req.id}): an internal error, see the server log"


@dataclass
class Job:
    """Work for the engine thread between decode steps (``Engine.call``)."""

    fn: Callable[[], Any]
    done: Callable[[Any, BaseException | None], None]
    tokens: int = 0


@dataclass
class Admission:
    """A request the scheduler admitted: its slot, cached prefix length and adapter index."""

    req: Request
    slot: int
    n_cached: int
    adapter: int


class Scheduler:
    """The waiting queue, admission into KV slots and adapter slots, the running batch.

    Args:
        cache: the slot cache.
        lora: an optional ``MultiLoRA``.
        max_queue: most requests waiting before ``QueueFull``.
        max_prefill_tokens: most prompt tokens prefilled between two decode steps.
        stats: the engine's counters (updated in place).
        lock: guards ``waiting`` (``add`` runs on the callers' threads).
    """

    def __init__(
        self,
        cache: SlotCache,
        lora: MultiLoRA | None,
        max_queue: int,
        max_prefill_tokens: int,
        stats: dict[str, float],
        lock: threading.Condition,
    ):
        self.cache = cache
        self.lora = lora
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.stats = stats
        self._lock = lock
        self.waiting: deque[Request] = deque()
        self.running: list[Sequence] = []

    def add(self, req: Request) -> None:
        """Queue a request (the caller holds the lock)."""
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
        self.waiting.append(req)
        self.stats["requests_total"] += 1

    def drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
        self.stats["requests_cancelled_total"] += len(gone)
        for seq in [s for s in self.running if s.req.cancelled]:
            self.stats["requests_cancelled_total"] += 1
            self.release(seq)

    def admissions(self) -> Iterator[Admission]:
        """Admit waiting requests in order while slots, memory and the prefill budget allow.

        A generator: the engine prefills each admission before the next is decided, so a
        request can reuse the prefix that the one before it has just written.
        """
        budget = self.max_prefill_tokens
        while budget > 0:
            with self._lock:
                if not self.waiting:
                    return
                req = self.waiting[0]
            adapter = 0
            if req.adapter is not None:
                try:
                    got_adapter = self._adapters().acquire(req.adapter)
                except FolkError as exc:
                    self._reject(req, str(exc))
                    continue
                if got_adapter is None:
                    return  # every adapter slot is busy: wait for a sequence to finish
                adapter = got_adapter
            need = len(req.prompt) + req.max_tokens
            reuse = not req.echo_logprobs
            got = self.cache.acquire(req.prompt, need, req.adapter, reuse)
            if got is None and not self.running:
                self.cache.shrink(0)  # idle buffers shaped for an earlier burst: start afresh
                got = self.cache.acquire(req.prompt, need, req.adapter, reuse)
            if got is None:
                if req.adapter is not None:
                    self._adapters().release(req.adapter)
                if not self.running:  # cannot fit even alone (check_length prevents this)
                    self._reject(req, "no memory")
                    continue
                return  # no slot or memory yet: a running sequence will free one
            with self._lock:
                self.waiting.popleft()
            slot, n_cached = got
            budget -= len(req.prompt) - n_cached
            self.stats["prompt_tokens_total"] += len(req.prompt)
            self.stats["prefix_cached_tokens_total"] += n_cached
            yield Admission(req, slot, n_cached, adapter)

    def _adapters(self) -> MultiLoRA:
        """The ``MultiLoRA`` for a request that names an adapter."""
        if self.lora is None:
            raise FolkError("this engine serves no adapters")
        return self.lora

    def _reject(self, req: Request, error: str) -> None:
        with self._lock:
            self.waiting.popleft()
        req.sink({"type": "finish", "finish_reason": "error", "error": error})

    def abort(self, adm: Admission) -> None:
        """Free what an admission holds when its prefill failed before it started running."""
        self.cache.release(adm.slot, keep=False)
        if adm.req.adapter is not None:
            self._adapters().release(adm.req.adapter)

    def release(self, seq: Sequence) -> None:
        """Take a sequence out of the batch; its slot keeps the tokens as a prefix."""
        self.running.remove(seq)
        self.cache.release(seq.slot)
        if seq.req.adapter is not None and self.lora is not None:
            self.lora.release(seq.req.adapter)


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
        max_prefill_tokens: most prompt tokens prefilled between two decode steps.
    """

    def __init__(
        self,
        llm: LLM,
        max_batch: int = 16,
        max_queue: int = 256,
        max_len: int | None = None,
        kv_budget_bytes: int = 4 << 30,
        lora: MultiLoRA | None = None,
        keep_prefixes: int = 4,
        max_prefill_tokens: int = 1024,
    ):
        self.llm = llm
        self.model: CausalLM = llm.model
        self.tokenizer = llm.tokenizer
        self.eos = set(llm.eos_token_ids)
        ctx = llm.config.max_position_embeddings
        self.max_len = min(ctx, max_len or ctx)
        self.cache = SlotCache(llm.config, max_batch, self.max_len, llm.dtype, kv_budget_bytes)
        self.keep_prefixes = keep_prefixes
        self.vocab = llm.config.vocab_size
        self.jobs: deque[Job] = deque()
        self.max_prefill_tokens = max_prefill_tokens
        self._cv = threading.Condition()
        self._stop = False
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
        self.scheduler = Scheduler(
            self.cache, lora, max_queue, max_prefill_tokens, self.stats, self._cv
        )
        self.runner = ModelRunner(self.model, lora)
        self.output = OutputProcessor(
            self.tokenizer, self.eos, self.vocab, self.stats, self.observers
        )
        self.lora = lora
        self._job_debt = 0.0  # seconds jobs ran beyond the decode steps' time since
        self._grammars: GrammarCache | None = None
        self._grammars_lock = threading.Lock()
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

    def grammars(self) -> GrammarCache:
        """The compiled-grammar cache of constrained decoding (built at first use, ~0.5 s:
        call it off the event loop)."""
        with self._grammars_lock:
            if self._grammars is None:
                eos = sorted(self.eos)
                self._grammars = GrammarCache(GrammarTokenizer(self.tokenizer, self.vocab, eos))
            return self._grammars

    def submit(self, req: Request) -> Request:
        self.check_length(len(req.prompt), req.max_tokens)
        req.sampling()  # raises FolkError on a bad option
        with self._cv:
            self.scheduler.add(req)
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (client gone): its slot is freed before the next decode step."""
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    def call(
        self,
        fn: Callable[[], Any],
        done: Callable[[Any, BaseException | None], None],
        tokens: int = 0,
    ):
        """Run ``fn`` on the engine thread between steps (embeddings, adapter loads).

        ``tokens`` is what the job feeds the model. Between two decode steps the jobs run
        within a budget -- ``max_prefill_tokens``, a sixteenth of it while sequences are
        running, at least one job -- and, while sequences are running, only when the
        jobs' time so far does not exceed the decode steps' (a deficit counter), so a
        burst of them (an embeddings request of many long inputs, in chunks) takes at most
        about half of the engine's time from the running streams."""
        with self._cv:
            self.jobs.append(Job(fn, done, tokens))
            self._cv.notify()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    @property
    def lora(self) -> MultiLoRA | None:
        """The ``MultiLoRA`` of per-row adapters (settable while idle), or None."""
        return self.runner.lora

    @lora.setter
    def lora(self, lora: MultiLoRA | None) -> None:
        self.runner.lora = self.scheduler.lora = lora

    @property
    def max_queue(self) -> int:
        """Most requests waiting before ``QueueFull`` (settable)."""
        return self.scheduler.max_queue

    @max_queue.setter
    def max_queue(self, n: int) -> None:
        self.scheduler.max_queue = n

    @property
    def waiting(self) -> deque[Request]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

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
                jobs: list[Job] = []
                budget = self.max_prefill_tokens // (16 if self.running else 1)
                if not self.running:
                    self._job_debt = 0.0
                while (
                    self.jobs
                    and self._job_debt <= 0
                    and (not jobs or self.jobs[0].tokens <= budget)
                ):
                    jobs.append(self.jobs.popleft())
                    budget -= jobs[-1].tokens
            t = time.perf_counter()
            for job in jobs:
                try:
                    result, error = job.fn(), None
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    result, error = None, exc
                job.done(result, error)
            if jobs and self.running:  # time-fair: jobs wait while they owe decode time
                self._job_debt += time.perf_counter() - t
            try:
                with torch.inference_mode():
                    self.scheduler.drop_cancelled()
                    for adm in self.scheduler.admissions():
                        self._prefill(adm)
                    if self.running:
                        self._decode_step()
            except Exception as exc:  # noqa: BLE001 - fail the batch, keep the server up
                for seq in list(self.running):
                    self._finish(seq, "error", error=client_error(exc, seq.req))
        for seq in list(self.running):
            self._finish(seq, "error", error="server shutting down")

    def _prefill(self, adm: Admission) -> None:
        req = adm.req
        seq = None
        try:
            seq = self.output.new_sequence(req, adm.slot, adm.adapter)
            logits = self.runner.prefill(
                req.prompt[adm.n_cached :],
                self.cache.view(adm.slot),
                adm.adapter,
                all_logits=req.echo_logprobs,
            )
            self.cache.tokens[adm.slot] = list(req.prompt)
            if req.echo_logprobs:
                data = prompt_logprobs(logits[0], req.prompt, req.logprobs or 0)
                req.sink({"type": "prompt_logprobs", "data": data})
                logits = logits[:, -1]
            self.running.append(seq)
            if req.max_tokens == 0:  # prompt logprobs only (completions with echo)
                return self._finish(seq, "length")
            reason = self.output.emit(seq, logits)
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            if seq is not None and seq in self.running:
                return self._finish(seq, "error", error=client_error(exc, req))
            self.scheduler.abort(adm)
            req.sink({"type": "finish", "finish_reason": "error", "error": client_error(exc, req)})
            return
        if reason is not None:
            self._finish(seq, reason)

    def _decode_step(self) -> None:
        t = time.perf_counter()
        try:
            self._decode_rows()
        finally:
            self._job_debt = max(0.0, self._job_debt - (time.perf_counter() - t))

    def _decode_rows(self) -> None:
        seqs = list(self.running)
        rows = [s.slot for s in seqs]
        view = self.cache.decode_view(rows)
        adapters = [s.adapter for s in seqs]
        tokens = [s.next_token for s in seqs]
        logits = self.runner.decode(rows, tokens, adapters, view, len(view.positions))
        self.stats["decode_steps_total"] += 1
        for o in self.observers:
            o("batch_size", float(len(seqs)))
        for s in seqs:
            self.cache.tokens[s.slot].append(s.next_token)
            try:  # this sequence's own work: constraint, sampler, text
                reason = self.output.emit(s, logits[s.slot : s.slot + 1])
            except Exception as exc:  # noqa: BLE001 - fails this request alone
                reason = None
                self._finish(s, "error", error=client_error(exc, s.req))
            if reason is not None:
                self._finish(s, reason)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self.scheduler.release(seq)
        self.output.finish(seq, reason, error)

"""Continuous batching on the bundled model in float32: requests join and leave the batch
at every step, finish out of arrival order, and greedy tokens do not depend on the batch.
Prefix reuse, cancellation, the memory budget and the bounded queue on a tiny model."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from folklm.engine.generate import generate
from folklm.engine.scheduler import Engine, QueueFull, Request
from folklm.errors import FolkError
from folklm.ops.sampling import SamplingParams


class Collector:
    def __init__(self, n: int):
        self.tokens = {i: [] for i in range(n)}
        self.finish: dict[int, dict] = {}
        self.order: list[int] = []
        self.steps: dict[int, list[int]] = {i: [] for i in range(n)}  # decode step per token
        self.engine: Engine | None = None
        self.done = threading.Semaphore(0)

    def sink(self, i: int):
        def sink(e):
            if e["type"] == "token":
                self.tokens[i].append(e["token"])
                self.steps[i].append(int(self.engine.stats["decode_steps_total"]))
            elif e["type"] == "finish":
                self.finish[i] = e
                self.order.append(i)
                self.done.release()

        return sink

    def wait(self, n: int, timeout: float = 300) -> None:
        for _ in range(n):
            assert self.done.acquire(timeout=timeout)


@pytest.fixture(scope="module")
def serving_llm():
    import folklm

    return folklm.load(dtype="float32")  # its own copy: float32, packed


PROMPTS = [
    "Tell me a long story about a dragon.",
    "What is 2+2?",
    "Name three colors.",
    "Write a haiku about rain.",
    "Who wrote Hamlet?",
    "Explain gravity in one sentence.",
    "List five fruits.",
    "Say hi.",
]
LENGTHS = [12, 3, 8, 10, 2, 6, 5, 2]


@pytest.mark.slow  # 8 requests each decoded alone, then batched
def test_batch_of_8_equals_alone_and_finishes_out_of_order(serving_llm):
    llm = serving_llm
    ids = [llm.encode_prompt(p) for p in PROMPTS]
    engine = Engine(llm, max_batch=8)
    try:
        c = Collector(8)
        c.engine = engine
        for i, (p, n) in enumerate(zip(ids, LENGTHS, strict=True)):
            engine.submit(Request(p, n, c.sink(i), temperature=0, ignore_eos=True))
        c.wait(8)
    finally:
        engine.shutdown()
    for i, (p, n) in enumerate(zip(ids, LENGTHS, strict=True)):
        alone = generate(
            llm.model, llm.tokenizer, [p], SamplingParams(max_new_tokens=n, ignore_eos=True), []
        )[0]
        assert c.tokens[i] == alone.token_ids, f"request {i} differs in a batch"
    # the short ones finished first although they arrived later
    assert c.order != list(range(8))
    assert c.order.index(7) < c.order.index(0) and c.order.index(4) < c.order.index(3)
    # and they shared decode steps with the long one: step numbers overlap
    shared = set(c.steps[0]) & set(c.steps[7])
    assert shared, "the short request did not decode in the same steps as the long one"
    assert engine.stats["decode_steps_total"] < sum(LENGTHS)


def test_request_joins_a_running_batch(serving_llm):
    llm = serving_llm
    engine = Engine(llm, max_batch=4)
    try:
        c = Collector(2)
        c.engine = engine
        long = llm.encode_prompt(PROMPTS[0])
        engine.submit(Request(long, 30, c.sink(0), temperature=0, ignore_eos=True))
        while len(c.tokens[0]) < 5:
            time.sleep(0.01)
        engine.submit(Request(llm.encode_prompt(PROMPTS[7]), 3, c.sink(1), temperature=0))
        c.wait(2)
    finally:
        engine.shutdown()
    assert c.order == [1, 0]  # joined late, left early
    assert set(c.steps[1]) <= set(c.steps[0])


def test_prefix_reuse_cancel_budget_queue(tiny_models):
    import folklm

    _, folder = tiny_models("llama")
    llm = folklm.load(folder, dtype="float32")
    engine = Engine(llm, max_batch=2, max_queue=2, kv_budget_bytes=1 << 20)
    try:
        system = list(range(3, 40))
        c = Collector(3)
        c.engine = engine
        engine.submit(Request([1, *system, 50], 5, c.sink(0), temperature=0))
        c.wait(1)
        before = engine.stats["prefix_cached_tokens_total"]
        engine.submit(Request([1, *system, 60, 61], 5, c.sink(1), temperature=0))
        c.wait(1)
        assert engine.stats["prefix_cached_tokens_total"] - before == 1 + len(system)
        ref = generate(llm.model, llm.tokenizer, [[1, *system, 60, 61]], SamplingParams(5), [])
        assert c.tokens[1] == ref[0].token_ids  # the reused prefix gives the same tokens
        # cancellation frees the slot before the next step
        r = engine.submit(Request([1, 2, 3], 200, c.sink(2), temperature=0, ignore_eos=True))
        while len(c.tokens[2]) < 3:
            time.sleep(0.01)
        engine.cancel(r)
        deadline = time.time() + 10
        while engine.running and time.time() < deadline:
            time.sleep(0.01)
        assert not engine.running and not any(engine.cache.busy)
        # longer than the context, or than the memory budget allows: refused up front
        with pytest.raises(FolkError, match="maximum context length is 256 .* 250 prompt"):
            engine.check_length(250, 10)
    finally:
        engine.shutdown()
    small = Engine(llm, max_batch=2, kv_budget_bytes=64 * engine.cache.bytes_per_token)
    try:
        with pytest.raises(FolkError, match="KV cache budget of 64 tokens"):
            small.check_length(50, 20)
        # within budget, the buffers never exceed it: two 30-token sequences fit, side by side
        c = Collector(2)
        c.engine = small
        for i in range(2):
            small.submit(Request([1, 5 + i, 7], 27, c.sink(i), temperature=0, ignore_eos=True))
        c.wait(2)
        assert small.cache.nbytes <= 64 * small.cache.bytes_per_token
    finally:
        small.shutdown()


def test_bounded_queue(tiny_models):
    import folklm

    _, folder = tiny_models("llama")
    engine = Engine(folklm.load(folder, dtype="float32"), max_batch=1, max_queue=2)
    try:
        c = Collector(4)
        c.engine = engine
        reqs = [
            Request([1, 2, 3], 150, c.sink(i), temperature=0, ignore_eos=True) for i in range(4)
        ]
        engine.submit(reqs[0])
        while not engine.running:
            time.sleep(0.005)
        engine.submit(reqs[1])
        engine.submit(reqs[2])
        with pytest.raises(QueueFull, match="2 waiting"):
            engine.submit(reqs[3])
        for r in reqs[:3]:
            engine.cancel(r)
    finally:
        engine.shutdown()


def test_idle_buffers_from_a_burst_do_not_block_a_long_request(tiny_models):
    import folklm

    _, folder = tiny_models("llama")
    llm = folklm.load(folder, dtype="float32")
    probe = Engine(llm, max_batch=1)
    per_token = probe.cache.bytes_per_token
    probe.shutdown()
    engine = Engine(llm, max_batch=4, kv_budget_bytes=200 * per_token, keep_prefixes=4)
    try:
        c = Collector(5)
        c.engine = engine
        for i in range(4):  # a burst: 4 rows of 40 tokens fill 160 of the 200-token budget
            engine.submit(Request([1, 10 + i, 7], 37, c.sink(i), temperature=0, ignore_eos=True))
        c.wait(4)
        assert engine.cache.rows == 4
        # 150 tokens fit the budget alone but not as 4 rows: the idle rows must make room
        engine.submit(Request([1, 2, 3], 147, c.sink(4), temperature=0, ignore_eos=True))
        c.wait(1, timeout=120)
        assert c.finish[4]["finish_reason"] == "length" and len(c.tokens[4]) == 147
    finally:
        engine.shutdown()


class FaultyConstraint:
    """A constraint (the ``Constraint`` protocol) that allows every token, then raises at
    step ``at``: the fault of one sequence's own work, as a broken grammar would be."""

    def __init__(self, vocab: int, at: int, exc: Exception):
        self.vocab, self.at, self.exc = vocab, at, exc

    def start(self):
        return 0

    def allowed(self, state):
        if state == self.at:
            raise self.exc
        return torch.ones(self.vocab, dtype=torch.bool)

    def advance(self, state, token):
        return state + 1

    def done(self, state):
        return False


@pytest.mark.parametrize(
    "exc, message",
    [
        (TypeError("'NoneType' object is not subscriptable"), "internal error, see the server"),
        (FolkError("response_format: the grammar hit its per-step limit"), "per-step limit"),
    ],
)
def test_a_fault_in_one_sequence_fails_that_request_alone(tiny_models, exc, message):
    """Finding 2 of issue 16: a raising constraint used to end every stream in the batch.
    Now the faulty request alone finishes with an error (no exception type in it) and the
    three others finish with the tokens they have alone."""
    import folklm

    _, folder = tiny_models("llama")
    llm = folklm.load(folder, dtype="float32")
    prompts = [[1, 5, 7], [1, 9, 11, 13], [1, 20], [1, 4, 4]]
    alone = [
        generate(llm.model, llm.tokenizer, [p], SamplingParams(20, ignore_eos=True), [])[0]
        for p in prompts
    ]
    engine = Engine(llm, max_batch=8)
    try:
        c = Collector(5)
        c.engine = engine
        for i, p in enumerate(prompts[:2]):
            engine.submit(Request(p, 20, c.sink(i), temperature=0, ignore_eos=True))
        bad = FaultyConstraint(llm.config.vocab_size, 4, exc)
        engine.submit(Request([1, 2, 3], 20, c.sink(4), constraint=bad, ignore_eos=True))
        for i, p in enumerate(prompts[2:], start=2):
            engine.submit(Request(p, 20, c.sink(i), temperature=0, ignore_eos=True))
        c.wait(5)
    finally:
        engine.shutdown()
    assert c.finish[4]["finish_reason"] == "error"
    assert message in c.finish[4]["error"] and "TypeError" not in c.finish[4]["error"]
    assert len(c.tokens[4]) == 4  # it ran until its fault
    for i in range(4):
        assert c.finish[i]["finish_reason"] == "length"
        assert c.tokens[i] == alone[i].token_ids, f"request {i} changed by the faulty one"

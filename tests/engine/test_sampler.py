"""One decoding core: every sampling option works through every path.

The OpenAI presence/frequency penalties through ``LLM.generate`` against a float64 reference
of their formula; logprobs through ``LLM.generate``; min-p and the repetition penalty
through the server ``Engine`` against ``generate`` and transformers; option checks in one
place; and stop strings handled by ``engine.text`` alone.
"""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest
import torch

import folklm
from folklm.engine.generate import generate
from folklm.engine.sampler import Sampler
from folklm.engine.scheduler import Engine, Request
from folklm.errors import FolkError
from folklm.ops.sampling import SamplingParams

SRC = Path(folklm.__file__).parent
PROMPT = [1, 5, 9, 17, 3, 40]


def reference_penalised_greedy(model, prompt, n, presence, frequency) -> list[int]:
    """Greedy decoding with ``logit - presence * [count > 0] - frequency * count`` over the
    generated tokens, in float64 on full forward passes (no cache)."""
    seq, out = list(prompt), []
    counts = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1].double()
            scores = logits - presence * (counts > 0).double() - frequency * counts
            token = int(scores.argmax())
            counts[token] += 1
            seq.append(token)
            out.append(token)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("presence,frequency", [(0.8, 0.0), (0.0, 0.6), (0.5, 1.5), (-2.0, 2.0)])
def test_presence_frequency_penalties_via_llm_generate(tiny_models, family, presence, frequency):
    _, folder = tiny_models(family)
    llm = folklm.load(folder, dtype="float32")
    prompt = " ".join(f"t{i}" for i in PROMPT)
    kw = dict(max_new_tokens=16, ignore_eos=True, chat=False)
    out = llm.generate(prompt, presence_penalty=presence, frequency_penalty=frequency, **kw)
    ids = llm.tokenizer.encode(prompt)
    ref = reference_penalised_greedy(llm.model, ids, 16, presence, frequency)
    assert out.token_ids == ref, f"{family} presence={presence} frequency={frequency}"
    plain = llm.generate(prompt, **kw)
    assert plain.token_ids != ref, "the penalties must change this output for the test to bite"


@pytest.mark.parametrize("presence,frequency", [(0.7, 0.45), (-1.5, 2.0)])
def test_penalties_shape_the_sampled_distribution_as_openai_defines(presence, frequency):
    """OpenAI's definition: ``mu[j] - c[j] * frequency - [c[j] > 0] * presence``, c[j] the
    times token j was generated so far; the draw is from the softmax of that over the
    temperature. Checked against a float64 hand computation at every step of a sampled run,
    and every draw is ``torch.multinomial``'s on those scores with the same generator."""
    B, V, T = 3, 12, 0.7  # 30 draws over 12 tokens: some token is drawn 3+ times
    data = torch.Generator().manual_seed(5)
    params = SamplingParams(temperature=T, presence_penalty=presence, frequency_penalty=frequency)
    empty = torch.zeros(B, 0, dtype=torch.long)
    sampler = Sampler(params, empty, V, generator=torch.Generator().manual_seed(9))
    twin = torch.Generator().manual_seed(9)
    counts = torch.zeros(B, V, dtype=torch.float64)  # the hand count of generated tokens
    rows = torch.arange(B)
    moved = 0.0
    for step in range(30):
        logits = torch.randn(B, V, generator=data) * 2
        scores = logits
        for process in sampler.processors:
            scores = process(scores)
        mu = logits.double() - frequency * counts - presence * (counts > 0).double()
        hand = (mu / T).softmax(-1)
        got = scores.softmax(-1)
        torch.testing.assert_close(got.double(), hand, atol=1e-6, rtol=0, msg=f"step {step}")
        moved = max(moved, float((hand - (logits.double() / T).softmax(-1)).abs().max()))
        token = sampler.sample(logits)
        assert token.tolist() == torch.multinomial(got, 1, generator=twin)[:, 0].tolist()
        sampler.accept(token)
        counts[rows, token] += 1
    assert counts.max() >= 3, "some token must repeat for the frequency term to act"
    assert moved > 0.05, "the penalties must move the distribution for the test to bite"


def test_logprobs_through_llm_generate(tiny_models):
    _, folder = tiny_models("llama")
    llm = folklm.load(folder, dtype="float32")
    out = llm.generate("t5 t9 t17", max_new_tokens=5, ignore_eos=True, logprobs=3, chat=False)
    ids = llm.tokenizer.encode("t5 t9 t17")
    with torch.no_grad():
        lp = llm.model(torch.tensor([ids + out.token_ids]))[0].log_softmax(-1)  # (T, V)
    assert len(out.logprobs) == 5
    for i, (token, info) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = lp[len(ids) - 1 + i]
        assert info["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        assert [t for t, _ in info["top"]] == row.topk(3).indices.tolist()


def engine_tokens(engine: Engine, prompt: list[int], n: int, **kw) -> list[int]:
    tokens: list[int] = []
    done = threading.Event()
    finish: dict = {}

    def sink(e):
        if e["type"] == "token":
            tokens.append(e["token"])
        elif e["type"] == "finish":
            finish.update(e)
            done.set()

    engine.submit(Request(prompt, n, sink, ignore_eos=True, **kw))
    assert done.wait(120)
    assert finish["finish_reason"] == "length", finish
    return tokens


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_repetition_penalty_and_min_p_through_the_server_engine(tiny_models, family):
    hf, folder = tiny_models(family)
    llm = folklm.load(folder, dtype="float32")
    engine = Engine(llm, max_batch=4)
    try:
        # repetition penalty, greedy: the tokens of transformers
        got = engine_tokens(engine, PROMPT, 20, temperature=0, repetition_penalty=1.3)
        ref = hf.generate(
            torch.tensor([PROMPT]),
            max_new_tokens=20,
            do_sample=False,
            repetition_penalty=1.3,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(PROMPT) :].tolist()
        assert got == ref
        plain = engine_tokens(engine, PROMPT, 20, temperature=0)
        assert plain != ref, "the penalty must change this output for the test to bite"
        # seeded min-p sampling (+ repetition penalty): the tokens of the single-prompt path
        kw = dict(temperature=1.5, min_p=0.3, repetition_penalty=1.2, top_k=20)
        for seed in (3, 11):
            got = engine_tokens(engine, PROMPT, 20, seed=seed, **kw)
            params = SamplingParams(max_new_tokens=20, ignore_eos=True, seed=seed, **kw)
            ref = generate(llm.model, llm.tokenizer, [PROMPT], params, [])[0].token_ids
            assert got == ref, f"seed={seed}"
        no_min_p = dict(kw, min_p=0.0)
        loose = [engine_tokens(engine, PROMPT, 20, seed=s, **no_min_p) for s in (3, 11)]
        tight = [engine_tokens(engine, PROMPT, 20, seed=s, **kw) for s in (3, 11)]
        assert loose != tight, "min_p must change these draws for the test to bite"
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    "bad",
    [
        dict(presence_penalty=2.5),
        dict(frequency_penalty=-3),
        dict(min_p=1.0),
        dict(repetition_penalty=0),
        dict(logprobs=-1),
    ],
)
def test_options_are_checked_in_one_place_for_every_path(tiny_models, bad):
    _, folder = tiny_models("llama")
    llm = folklm.load(folder, dtype="float32")
    name = next(iter(bad))
    with pytest.raises(FolkError, match=name):
        SamplingParams(**bad).validate()
    with pytest.raises(FolkError, match=name):
        llm.generate("t5", **bad)
    engine = Engine(llm, max_batch=2)
    try:
        with pytest.raises(FolkError, match=name):
            engine.submit(Request([1, 5], 4, lambda e: None, **bad))
    finally:
        engine.shutdown()


def _names_used(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return names | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}


def test_the_text_stream_is_the_only_place_handling_stop_strings():
    """Only ``engine/text.py`` detokenizes incrementally or matches stop strings; the
    decoding paths build ``TextStream``s and never look at stop strings themselves."""
    text_parts = {"StopMatcher", "IncrementalDetokenizer"}
    users: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        names = _names_used(path)
        if rel != "engine/text.py" and names & text_parts:
            users.setdefault("text parts", set()).add(rel)
        if "TextStream" in names:
            users.setdefault("TextStream", set()).add(rel)
        source = path.read_text()
        if rel != "engine/text.py" and (".split(stop" in source or ".find(stop" in source):
            users.setdefault("stop matching", set()).add(rel)
    assert "text parts" not in users, users
    assert "stop matching" not in users, users
    assert users["TextStream"] == {"engine/generate.py", "engine/output.py"}

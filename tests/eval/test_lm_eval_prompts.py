"""Every built-in task's requests equal those lm-eval builds itself, string for string.

lm-eval's own ``ConfigurableTask`` is built from the task YAML that lm-eval ships, over
our shipped records (see ``lmeval_tasks.py``): lm-eval renders the prompts and draws the
few-shot examples with its own sampler and seed; we compare its ``Instance`` arguments
with ``folk eval``'s requests. Checked once on every record of every task (hellaswag's
10,042, gsm8k's 1,319 with 5 shots, ...: all equal); the test runs the first ``LIMIT``.
"""

from __future__ import annotations

import re

import pytest
from lmeval_tasks import CASES, _hellaswag, harness_requests

from folklm.eval.builtin import resolve_tasks
from folklm.eval.data import load_records
from folklm.eval.runner import build_requests

LIMIT = 150  # records per task (all few-shot draws before them are made too)


def folk_requests(case: str, shots: int | None) -> list[tuple]:
    (spec,) = resolve_tasks(CASES[case][1])
    _, items = build_requests(spec, limit=LIMIT, shots=shots)
    out = []
    for it in items:
        if spec.kind == "rolling":
            out.append(((it["text"],),))
        elif spec.kind == "generate":
            out.append(((it["context"],),))
        else:
            out.append(tuple(tuple(r) for r in it["requests"]))
    return out


@pytest.mark.parametrize(
    "case,shots",
    [(c, None) for c in CASES] + [("mmlu_anatomy", 5), ("arc_easy", 3), ("boolq", 2)],
)
def test_prompts_equal_lm_eval_configurable_task(case, shots):
    theirs = harness_requests(case, shots, LIMIT)
    ours = folk_requests(case, shots)
    if case == "gsm8k":  # generate_until: (context, generation kwargs)
        assert all(t[0][1]["until"] == ["Question:", "</s>", "<|im_end|>"] for t in theirs)
        theirs = [((t[0][0],),) for t in theirs]
    assert len(ours) == len(theirs) >= min(LIMIT, 62)  # wikitext has 62 articles
    for n, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a == b, f"{case} record {n}: folk eval {a!r:.300} != lm-eval {b!r:.300}"


def test_the_hellaswag_split_assumption_only_moves_the_sentence_end():
    """The split we put back is a sentence end followed by a fragment: no text is lost."""
    (spec,) = resolve_tasks("hellaswag")
    for r in load_records(spec.data, spec.format, None)[:LIMIT]:
        hf = _hellaswag(r)
        joined = (hf["ctx_a"] + " " + hf["ctx_b"]).strip()
        assert not hf["ctx_b"] or hf["ctx_b"][0].islower()
        assert re.sub(r"\s+", " ", joined) == re.sub(r"\s+", " ", r["ctx"].partition(": ")[2])

"""The prefix-cached scorer against float64 transformers, the harness's windows and HFLM."""

from __future__ import annotations

import copy
import random

import pytest
import torch

import folklm
from folklm.eval.builtin import resolve_tasks
from folklm.eval.runner import build_requests
from folklm.eval.scorer import Scorer, rolling_windows


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"t{rng.randrange(3, 128)}" for _ in range(n))


def _reference(hf64, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(hf64(ids).logits[0], dim=-1)
    rows = logp[len(ctx) - 1 : len(ctx) - 1 + len(cont)]
    target = torch.tensor(cont)
    return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_matches_float64_transformers(tiny_models, family, batch_size):
    """Shared contexts, ragged contexts and continuations, left padding, several batches."""
    hf, folder = tiny_models(family)
    llm = folklm.load(folder, dtype="float32")
    rng = random.Random(batch_size)
    requests = []
    for _ in range(9):
        ctx = _words(rng, rng.randrange(1, 14))
        for _ in range(rng.randrange(1, 5)):  # options sharing the context
            requests.append((ctx, " " + _words(rng, rng.randrange(1, 7))))
    requests.append(("", "t5 t6 t7"))  # empty context: BOS is the context
    requests.append(("t9 t10 ", "t11"))  # trailing space moves to the continuation
    scorer = Scorer(llm, batch_size=batch_size)
    got = scorer.loglikelihood(requests)
    hf64 = copy.deepcopy(hf).double()
    for req, (ll, greedy) in zip(requests, got, strict=True):
        ref_ll, ref_greedy = _reference(hf64, *scorer.encode_pair(*req))
        assert ll == pytest.approx(ref_ll, abs=1e-4), req
        assert greedy == ref_greedy


def test_rolling_windows_are_the_harness_windows():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    rng = random.Random(3)
    for n in (1, 5, 16, 17, 40, 97):
        tokens = [rng.randrange(100) for _ in range(n)]
        for max_len in (1, 4, 16, 33):
            ref = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(tokens, 999, max_len, context_len=1)
            ]
            assert rolling_windows(tokens, 999, max_len) == [tuple(r) for r in ref]


def test_rolling_matches_sum_of_token_logprobs(tiny_models):
    hf, folder = tiny_models("llama")
    llm = folklm.load(folder, dtype="float32")
    text = _words(random.Random(5), 60)
    scorer = Scorer(llm, batch_size=4, max_length=16)  # several windows
    (ll,) = scorer.loglikelihood_rolling([text])
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    hf64 = copy.deepcopy(hf).double()
    ref = sum(_reference(hf64, c, x)[0] for c, x in rolling_windows(ids, 1, 16))
    assert ll == pytest.approx(ref, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["hellaswag", "arc_easy", "winogrande"])
def test_agrees_with_lm_eval_hf_backend(default_llm, task):
    """Per request within 1e-3 of lm-eval's HFLM on the same weights (fp32); the full
    200-item comparison is bench/agreement.py."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from folklm.hub.defaults import default_model_folder

    (spec,) = resolve_tasks(task)
    _, items = build_requests(spec, limit=6)
    reqs = [r for it in items for r in it["requests"]]
    ours = Scorer(default_llm, batch_size=8).loglikelihood(reqs)
    lm = HFLM(pretrained=str(default_model_folder()), dtype="float32", batch_size=8, device="cpu")
    theirs = lm.loglikelihood(
        [Instance("loglikelihood", {}, r, i, (task, i, 1)) for i, r in enumerate(reqs)],
        disable_tqdm=True,
    )
    for (a, ga), (b, gb) in zip(ours, theirs, strict=True):
        assert abs(a - b) < 1e-3
        assert ga == gb


def test_generation_takes_the_tasks_sampling_options(tiny_models):
    """lm-eval ``gen_kwargs`` reach the shared sampler: greedy unless ``do_sample``."""
    from folklm.engine.generate import generate
    from folklm.eval.harness import sampling_options
    from folklm.ops.sampling import SamplingParams

    assert sampling_options({"until": ["\n"], "temperature": 0.7}) == {"temperature": 0.0}
    kw = {"do_sample": True, "temperature": 1.4, "top_p": 0.9, "seed": 5, "max_gen_toks": 9}
    opts = sampling_options(kw)
    assert opts == {"temperature": 1.4, "top_p": 0.9, "seed": 5}
    _, folder = tiny_models("llama")
    llm = folklm.load(folder)
    scorer = Scorer(llm)
    text = scorer.generate(["t5 t9 t40"], ["t7"], 12, **opts)[0]
    params = SamplingParams(max_new_tokens=12, stop=["t7"], **opts)
    ids = scorer.encode("t5 t9 t40")
    want = generate(llm.model, llm.tokenizer, [ids], params, llm.eos_token_ids)[0].text
    greedy = scorer.generate(["t5 t9 t40"], ["t7"], 12)[0]
    assert text == want and text != greedy

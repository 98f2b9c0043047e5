"""Token selection checked against transformers' own logits processors.

The reference is ``transformers.generation.logits_process`` applied in the order
``GenerationMixin._get_logits_processor`` builds them (repetition penalty, temperature, top-k,
top-p, min-p) followed by ``torch.multinomial`` as in ``GenerationMixin._sample``. Logits are
fresh random numbers on every run; each test prints its seed in the failure message.
"""

from __future__ import annotations

import math
import secrets

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from folklm.errors import FolkError
from folklm.ops.sampling import SamplingParams, apply_repetition_penalty, filter_logits, select


@pytest.fixture
def seed() -> int:
    return secrets.randbits(31)


def random_logits(seed: int, B: int = 6, V: int = 97) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a spread of 3 makes every filter cut somewhere in the middle of the vocabulary
    return torch.randn(B, V, generator=g) * 3.0


def random_seen(seed: int, B: int, V: int, L: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, V, (B, L), generator=g)  # repeats included on purpose


def hf_processors(p: SamplingParams) -> LogitsProcessorList:
    """The list transformers builds for these settings (a neutral setting adds nothing)."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=p.repetition_penalty))
    if p.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k > 0:
        procs.append(TopKLogitsWarper(top_k=p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=p.top_p))
    if p.min_p > 0:
        procs.append(MinPLogitsWarper(min_p=p.min_p))
    return procs


def assert_same_filter(ours: torch.Tensor, ref: torch.Tensor, msg: str) -> None:
    kept, ref_kept = torch.isfinite(ours), torch.isfinite(ref)
    assert torch.isneginf(ours[~kept]).all(), msg
    diff = (kept != ref_kept).nonzero().tolist()
    assert not diff, f"{msg}: surviving tokens differ at (row, token) {diff[:10]}"
    torch.testing.assert_close(ours[kept], ref[ref_kept], rtol=1e-6, atol=1e-6, msg=msg)


SINGLE = [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_k=10),
    dict(temperature=1.0, top_k=96),
    dict(temperature=1.0, top_p=0.5),
    dict(temperature=1.0, top_p=0.95),
    dict(temperature=1.0, top_p=1e-6),  # keeps only the most likely token
    dict(temperature=1.0, top_p=1e-9),  # 1 - top_p rounds to 1.0: everything but the top falls
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=1.0, min_p=0.5),
]
COMBINED = [
    dict(temperature=0.6, top_k=40, top_p=0.9, min_p=0.02),
    dict(temperature=1.7, top_k=20, top_p=0.8),
    dict(temperature=1.3, top_p=0.7, min_p=0.1),
    dict(temperature=0.9, top_k=5, min_p=0.3),
    dict(temperature=2.5, top_k=50, top_p=0.99, min_p=0.01),
]


@pytest.mark.parametrize("kw", SINGLE + COMBINED, ids=str)
def test_filter_logits_matches_transformers(kw, seed):
    p = SamplingParams(**kw).validate()
    logits = random_logits(seed)
    dummy_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    ref = hf_processors(p)(dummy_ids, logits.clone())
    ours = filter_logits(logits.clone(), p)
    msg = f"{kw} seed={seed}"
    assert_same_filter(ours, ref, msg)
    if kw.get("top_k", 0) or kw.get("top_p", 1.0) < 1 or kw.get("min_p", 0):
        assert not torch.isfinite(ours).all(), f"{msg}: nothing was filtered"


@pytest.mark.parametrize("kw", SINGLE + COMBINED, ids=str)
def test_filter_logits_with_ties_matches_transformers(kw, seed):
    """Whole-number logits tie often: ties at the k-th place, and sorted ties in top-p."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-4, 5, (6, 97), generator=g).float()
    logits[0] = 0.0  # a uniform row
    dummy_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    ref = hf_processors(SamplingParams(**kw))(dummy_ids, logits.clone())
    assert_same_filter(
        filter_logits(logits.clone(), SamplingParams(**kw)), ref, f"{kw} seed={seed}"
    )


LN2 = math.log(2)


@pytest.mark.parametrize(
    "kw, logits",
    [
        # probabilities 1/4 each: cumulative 1/4 from the bottom is exactly 1 - top_p
        (dict(top_p=0.75), [0.0, 0.0, 0.0, 0.0]),
        (dict(top_p=0.5), [0.0, 0.0, 0.0, 0.0]),
        # probabilities 4:2:2:1: the 2s are exactly 0.5 x the top one, the 1 is 0.25 x
        (dict(min_p=0.5), [0.0, -LN2, -LN2, -2 * LN2]),
        (dict(min_p=0.25), [0.0, -LN2, -LN2, -2 * LN2]),
        (dict(top_k=2), [0.0, -LN2, -LN2, -2 * LN2]),  # a tie at the k-th place: both stay
    ],
    ids=str,
)
def test_filter_boundaries_match_transformers(kw, logits):
    """Exactly-on-the-threshold cases, where < and <= part ways."""
    p = SamplingParams(temperature=1.0, **kw)
    x = torch.tensor([logits])
    ref = hf_processors(p)(torch.zeros(1, 1, dtype=torch.long), x.clone())
    assert_same_filter(filter_logits(x.clone(), p), ref, str(kw))


@pytest.mark.parametrize("penalty", [1.3, 0.8, 2.0])
def test_repetition_penalty_matches_transformers(penalty, seed):
    logits = random_logits(seed)
    B, V = logits.shape
    seen = random_seen(seed, B, V)
    ref = RepetitionPenaltyLogitsProcessor(penalty=penalty)(seen, logits.clone())
    ours = apply_repetition_penalty(logits.clone(), seen, penalty)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0, msg=f"penalty={penalty} seed={seed}")
    changed = ours != logits
    assert changed.any(), f"seed={seed}: the penalty changed nothing"
    for b in range(B):  # exactly the seen tokens move, each away from being picked
        assert set(changed[b].nonzero().flatten().tolist()) <= set(seen[b].tolist())


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.8, top_k=30, top_p=0.9, min_p=0.02, repetition_penalty=1.3),
        dict(temperature=1.2, top_p=0.95, repetition_penalty=0.9),
        dict(temperature=1.0, top_k=12, repetition_penalty=1.8),
        dict(temperature=0.5, min_p=0.1),
    ],
    ids=str,
)
def test_select_matches_transformers_pipeline_and_sampler(kw, seed):
    """Same filtered distribution and, from the same generator state, the same draws as
    transformers' ``probs = softmax(processors(ids, logits)); multinomial(probs, 1)``."""
    p = SamplingParams(**kw).validate()
    msg = f"{kw} seed={seed}"
    for step in range(5):
        logits = random_logits(seed + 7 * step)
        B, V = logits.shape
        seen = random_seen(seed + 7 * step, B, V)
        ref_scores = hf_processors(p)(seen, logits.clone())
        ours_scores = filter_logits(apply_repetition_penalty(logits, seen, p.repetition_penalty), p)
        assert_same_filter(ours_scores, ref_scores, msg)

        g_ours = torch.Generator().manual_seed(seed + step)
        g_ref = torch.Generator().manual_seed(seed + step)
        ours = select(logits.clone(), p, g_ours, seen)
        ref = torch.multinomial(ref_scores.softmax(dim=-1), 1, generator=g_ref).squeeze(1)
        assert ours.shape == (B,) and ours.dtype == torch.long, msg
        assert torch.equal(ours, ref), f"{msg} step={step}: {ours.tolist()} != {ref.tolist()}"
        assert torch.isfinite(ref_scores.gather(1, ours[:, None])).all(), msg


def test_greedy_is_argmax(seed):
    logits = random_logits(seed)
    B, V = logits.shape
    p = SamplingParams(temperature=0.0, top_k=3, top_p=0.5).validate()
    assert p.greedy
    assert torch.equal(select(logits, p), logits.argmax(dim=-1)), f"seed={seed}"

    # with a repetition penalty: argmax of the penalised logits, as transformers' greedy search;
    # every row has seen its own favourite, so the penalty changes the answer somewhere
    seen = torch.cat([random_seen(seed, B, V, L=8), logits.argmax(dim=-1, keepdim=True)], dim=1)
    p = SamplingParams(temperature=0.0, repetition_penalty=5.0).validate()
    ref = RepetitionPenaltyLogitsProcessor(penalty=5.0)(seen, logits.clone()).argmax(dim=-1)
    assert torch.equal(select(logits, p, seen=seen), ref), f"seed={seed}"
    assert not torch.equal(ref, logits.argmax(dim=-1)), f"seed={seed}: penalty changed nothing"


def draw_sequence(logits: torch.Tensor, p: SamplingParams, seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(select(logits, p, g)[0]) for _ in range(n)]


def test_seeded_sampling_is_reproducible(seed):
    logits = random_logits(seed, B=1, V=50) / 3.0  # high entropy: many likely tokens
    p = SamplingParams(temperature=1.0, top_k=40, top_p=0.98).validate()
    a = draw_sequence(logits, p, seed, 64)
    b = draw_sequence(logits, p, seed, 64)
    assert a == b, f"seed={seed}: the same seed gave different tokens"
    others = [tuple(draw_sequence(logits, p, seed + k, 64)) for k in range(1, 6)]
    assert all(o != tuple(a) for o in others), f"seed={seed}: different seeds, same tokens"
    assert len(set(a)) > 5, f"seed={seed}: sampling looks degenerate: {a}"


def chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Upper tail of the chi-square statistic; bins expected below 5 are merged."""
    counts, expected = counts.double(), expected.double()
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(len(counts) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=8),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=0.9, top_k=10, top_p=0.95, min_p=0.05),
    ],
    ids=str,
)
def test_sampling_frequencies_match_filtered_softmax(kw, seed):
    V, N = 16, 200_000
    logits = random_logits(seed, B=1, V=V) * 0.6
    p = SamplingParams(**kw).validate()
    probs = hf_processors(p)(torch.zeros(1, 1, dtype=torch.long), logits.clone()).softmax(-1)[0]
    # one call with N identical rows: N independent draws; the sampler's seed is fixed so that
    # a run is repeatable, the logits are not
    g = torch.Generator().manual_seed(12345)
    tokens = select(logits.expand(N, V).contiguous(), p, g)
    counts = torch.bincount(tokens, minlength=V)
    msg = f"{kw} seed={seed} counts={counts.tolist()} probs={[round(x, 4) for x in probs.tolist()]}"
    assert (counts[probs == 0] == 0).all(), f"{msg}: a filtered token was drawn"
    alive = probs > 0
    p_value = chi_square_p_value(counts[alive], N * probs[alive])
    assert p_value > 1e-6, f"{msg}: chi-square p={p_value:.2e}"


def test_chi_square_check_can_fail(seed):
    """The frequency check above rejects a sampler that is off by a small, real amount."""
    V, N = 16, 200_000
    probs = random_logits(seed, B=1, V=V)[0].mul(0.6).softmax(-1)
    skewed = probs.clone()
    top = int(probs.argmax())
    skewed[top] *= 1.05  # 5% too often, renormalised
    skewed /= skewed.sum()
    g = torch.Generator().manual_seed(12345)
    counts = torch.bincount(
        torch.multinomial(skewed, N, replacement=True, generator=g), minlength=V
    )
    assert chi_square_p_value(counts, N * probs) < 1e-6, f"seed={seed}"


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", -1),
        ("max_new_tokens", 2.5),
        ("top_p", 0),
        ("top_p", 1.5),
        ("temperature", -1),
        ("temperature", float("nan")),
        ("min_p", 1),
        ("min_p", -0.1),
        ("top_k", -1),
        ("top_k", 3.0),
        ("repetition_penalty", 0),
        ("stop", [""]),
        ("stop", ["ok", 3]),
        ("stop", "###"),  # a bare string is not a list of stop strings
    ],
)
def test_validate_rejects_bad_values(field, value):
    with pytest.raises(FolkError) as err:
        SamplingParams(**{field: value}).validate()
    message = str(err.value)
    assert message.startswith(f"{field}="), message
    assert "\n" not in message


def test_validate_accepts_boundary_values():
    p = SamplingParams(
        max_new_tokens=0, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, stop=["\n\n", "###"]
    )
    assert p.validate() is p
    SamplingParams(top_p=1e-9, min_p=0.999, repetition_penalty=1e-3).validate()

"""Metrics, standard errors and answer extraction, as lm-evaluation-harness computes them.

* Means (acc, acc_norm, exact_match): standard error ``sample_std / sqrt(n)`` with Bessel's
  correction (lm_eval/api/metrics.py ``mean_stderr``).
* ``perplexity`` (LAMBADA) is ``exp(-mean(ll))``; its standard error is bootstrapped (the
  harness bootstraps it too), here with a fixed seed so a rerun prints the same number.
* Rolling perplexities are ratios of sums (``weighted_perplexity``, ``bits_per_byte``); the
  harness gives them no standard error and neither do we.
* A group (MMLU) is the size-weighted mean of its subtasks with the pooled standard error
  (``pooled_sample_stderr``).
* Generation answers go through regex filters (``RegexFilter``: ``findall``, the
  ``group_select``-th match, the first non-empty group of a tuple, stripped, else
  ``[invalid]``) and ``exact_match`` after ``regexes_to_ignore`` and case folding (the
  Hugging Face ``evaluate`` exact-match metric the harness wraps).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np


def mean_stderr(xs: Sequence[float]) -> float | None:
    n = len(xs)
    if n < 2:
        return None
    a = np.asarray(xs, dtype=np.float64)
    return float(a.std(ddof=1) / math.sqrt(n))


def perplexity(lls: Sequence[float]) -> float:
    return math.exp(-float(np.mean(lls)))


def bootstrap_perplexity_stderr(lls: Sequence[float], iters: int = 1000, seed: int = 1234):
    if len(lls) < 2:
        return None
    a = np.asarray(lls, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(iters, len(a)))
    stats = np.exp(-a[idx].mean(axis=1))
    return float(stats.std(ddof=1))


def weighted_perplexity(lls: Sequence[float], weights: Sequence[int]) -> float:
    return math.exp(-sum(lls) / sum(weights))


def bits_per_byte(lls: Sequence[float], n_bytes: Sequence[int]) -> float:
    return -sum(lls) / sum(n_bytes) / math.log(2)


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """Standard error of the size-weighted mean of subtasks (pooled sample variance)."""
    var = sum((n - 1) * s**2 * n for s, n in zip(stderrs, sizes, strict=True)) / (
        sum(sizes) - len(sizes)
    )
    return float(math.sqrt(var / sum(sizes)))


def regex_extract(text: str, pattern: str, group_select: int = 0, fallback: str = "[invalid]"):
    """The answer a regex filter keeps from a model's text."""
    found = re.findall(pattern, text if isinstance(text, str) else "")
    if not found:
        return fallback
    try:
        match = found[group_select]
    except IndexError:
        return fallback
    if isinstance(match, tuple):
        nonempty = [m for m in match if m]
        match = nonempty[0] if nonempty else fallback
    return match.strip()


def exact_match(
    prediction: str, reference: str, regexes_to_ignore: Sequence[str] = (), ignore_case=False
) -> float:
    for pattern in regexes_to_ignore:
        prediction = re.sub(pattern, "", prediction)
        reference = re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    return float(prediction == reference)

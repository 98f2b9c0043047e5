"""Per-row pieces of a continuous-batching step: decode masks, token choice, logprobs.

Each row of a serving batch has its own sampling settings, so token choice runs row by
row: the OpenAI presence/frequency penalties (``logit -= presence * [count > 0] +
frequency * count`` over the tokens generated so far, as the OpenAI API reference defines
them), an optional output constraint (a boolean mask over the vocabulary), then greedy or
temperature/top-k/top-p sampling with the row's own seeded generator
(``ops.sampling.filter_logits``, the transformers order). Log-probabilities are those of
the model's distribution before any of these adjustments, as the OpenAI API reports them.
"""

from __future__ import annotations

from typing import Any

import torch

from folklm.ops.sampling import SamplingParams, filter_logits


def build_decode_masks(
    positions: torch.Tensor, span: int, windows: list[int | None]
) -> dict[int | None, torch.Tensor]:
    """{window: (B, 1, 1, span) bool}: row b sees key slots ``<= positions[b]`` (in window)."""
    k = torch.arange(span)[None, :]  # (1, S)
    q = positions[:, None]  # (B, 1)
    base = k <= q
    masks = {}
    for w in windows:
        m = base if w is None else base & (q - k < w)
        masks[w] = m[:, None, None, :]
    return masks


def _top(lp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, ids = lp.topk(k)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def pick_token(logits: torch.Tensor, seq: Any, eos: set[int]) -> tuple[int, dict | None]:
    """Choose one token for a row from its logits (V,); return it and its logprob info."""
    req = seq.req
    scores = logits
    if seq.counts is not None:
        counts = seq.counts
        scores = scores - req.presence_penalty * (counts > 0) - req.frequency_penalty * counts
    if req.constraint is not None:
        allowed = req.constraint.allowed(seq.state)  # (V,) bool
        scores = scores.masked_fill(~allowed, float("-inf"))
    if req.temperature == 0:
        token = int(scores.argmax())
    else:
        params = SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
        probs = filter_logits(scores[None], params).softmax(dim=-1)
        token = int(torch.multinomial(probs, 1, generator=seq.generator))
    info = None
    if req.logprobs is not None:
        lp = logits.log_softmax(dim=-1)
        info = {"logprob": float(lp[token]), "top": _top(lp, req.logprobs)}
    return token, info


def prompt_logprobs(logits: torch.Tensor, req: Any) -> list[dict[str, Any]]:
    """Per prompt token: its logprob given the tokens before (None for the first) and the
    top alternatives there. ``logits`` (T, V) from a full-prompt forward pass."""
    lp = logits.log_softmax(dim=-1)  # (T, V): row t predicts token t + 1
    k = req.logprobs or 0
    out: list[dict[str, Any]] = [{"token": req.prompt[0], "logprob": None, "top": []}]
    for t in range(1, len(req.prompt)):
        tok = req.prompt[t]
        out.append({"token": tok, "logprob": float(lp[t - 1, tok]), "top": _top(lp[t - 1], k)})
    return out

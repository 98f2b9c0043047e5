"""Merge methods as small pure functions on tensors.

Each function takes the same tensor from every input (and the base model's, where the
method needs one) and returns the merged tensor; maths runs in float32 (float64 when the
inputs are float64) and the caller casts the result.

- Linear / model soup (Wortsman et al., 2022, arXiv:2203.05482): ``Σ wᵢ θᵢ / Σ wᵢ``.
- Task arithmetic (Ilharco et al., 2023, arXiv:2212.04089): ``θ₀ + λ Σ wᵢ (θᵢ − θ₀)``.
- TIES (Yadav et al., 2023, arXiv:2306.01708): trim each task vector to its ``density``
  largest magnitudes, elect a sign per element from the summed (weighted) task vectors,
  and average only the entries that agree with it (disjoint merge).
- DARE (Yu et al., 2024, arXiv:2311.03099): drop each delta element with probability
  ``1 − density`` and rescale the survivors by ``1 / density`` (the expectation of the
  delta is preserved); used under task arithmetic (``dare_linear``) and TIES
  (``dare_ties``). This is the paper's rescale; mergekit instead rescales the dropped
  delta to the L1 norm of the original, so DARE results differ from mergekit's (their
  random masks differ in any case).
- SLERP (Shoemake, 1985): spherical interpolation between two flattened tensors; it falls
  back to linear interpolation when they are (nearly) parallel.

The weighting conventions follow mergekit (arcee-ai/mergekit) so that the same YAML gives
the same tensors: weights multiply the task vectors before sign election, the disjoint
merge divides by the sum of the weights that agree (``normalize``), and ``lambda`` scales
the merged delta.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True
) -> torch.Tensor:
    """Weighted average ``Σ wᵢ θᵢ / Σ wᵢ`` (``normalize``) or weighted sum."""
    dtype = _work_dtype(tensors[0])
    out = torch.zeros(tensors[0].shape, dtype=dtype)
    for t, w in zip(tensors, weights, strict=True):
        out.add_(t.to(dtype), alpha=float(w))
    if normalize:
        total = float(sum(weights))
        if abs(total) < 1e-12:
            raise ValueError("linear merge: the weights sum to zero, cannot normalize")
        out.div_(total)
    return out


def magnitude_cut(delta: torch.Tensor, density: float) -> tuple[float, int]:
    """Where TIES trims ``delta``: keep the ``k = max(1, int(density · n))`` largest
    magnitudes, i.e. every entry with ``|δ| > cut`` plus the first ``ties`` entries (in
    index order) with ``|δ| == cut``."""
    mags = delta.detach().reshape(-1).to(_work_dtype(delta), copy=True).abs_()
    return _cut(mags, density)


def _cut(mags: torch.Tensor, density: float) -> tuple[float, int]:
    """:func:`magnitude_cut` from a scratch tensor of magnitudes, which it reorders: an
    in-place partial sort, no index tensor (unlike ``topk``/``argsort``)."""
    n = mags.numel()
    k = max(1, int(density * n))
    a = mags.numpy()
    a.partition(n - k)  # a[n-k] is the k-th largest; everything after it is >= it
    cut = a[n - k]
    greater = int((a[n - k + 1 :] > cut).sum())
    return float(cut), k - greater


def _keep_mask(mags: torch.Tensor, cut: float, ties_left: int) -> tuple[torch.Tensor, int]:
    """Entries of one chunk that survive :func:`magnitude_cut`; returns the ties still to
    keep in later chunks."""
    keep = mags > cut
    if ties_left > 0:
        eq = mags == cut
        take = eq & (eq.cumsum(0) <= ties_left)
        ties_left -= int(take.sum())
        keep |= take
    return keep, ties_left


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``max(1, int(density · n))`` largest-magnitude entries of ``delta``."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    cut, ties_left = magnitude_cut(delta, density)
    keep, _ = _keep_mask(delta.abs().reshape(-1), cut, ties_left)
    return (delta.reshape(-1) * keep).view_as(delta)


def dare(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability ``1 − density``, rescale survivors by ``1/density``.

    ``E[dare(δ)] = δ`` for any density in (0, 1].
    """
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    return torch.where(keep, delta / density, torch.zeros((), dtype=delta.dtype))


def elect_sign(deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election: ``+1`` where the summed deltas are ≥ 0, else ``−1``.

    Args:
        deltas: ``(n_models, *shape)`` weighted, trimmed task vectors.
    """
    return torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)


def disjoint_merge(
    deltas: torch.Tensor, weights: torch.Tensor, sign: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """Sum of the entries whose sign agrees with ``sign`` (zeros never agree), divided by
    the sum of the weights of the agreeing models where ``normalize``.

    Args:
        deltas: ``(n_models, *shape)`` weighted task vectors.
        weights: ``(n_models,)``.
        sign: ``shape``, entries ±1.
    """
    agree = deltas.sign() == sign  # (n_models, *shape)
    merged = (deltas * agree).sum(dim=0)
    if not normalize:
        return merged
    w = weights.reshape(-1, *([1] * (deltas.dim() - 1))).to(deltas.dtype)
    divisor = (w * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    return merged / divisor


def task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    lam: float = 1.0,
    normalize: bool = False,
    densities: Sequence[float] | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """``θ₀ + λ Σ wᵢ δᵢ`` (divided by ``Σ wᵢ`` where ``normalize``), ``δᵢ = θᵢ − θ₀``.

    With ``densities`` and ``generators`` each ``δᵢ`` first goes through :func:`dare`.
    """
    dtype = _work_dtype(base)
    b = base.to(dtype)
    merged = torch.zeros_like(b)
    for i, (t, w) in enumerate(zip(tensors, weights, strict=True)):
        delta = t.to(dtype) - b
        if densities is not None and generators is not None:
            delta = dare(delta, densities[i], generators[i])
        merged.add_(delta, alpha=float(w))
    if normalize:
        total = float(sum(weights))
        if abs(total) >= 1e-8:
            merged.div_(total)
    return b + lam * merged


def ties(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    lam: float = 1.0,
    normalize: bool = True,
    generators: Sequence[torch.Generator] | None = None,
    chunk: int = 1 << 20,
    release: Callable[[torch.Tensor], object] | None = None,
) -> torch.Tensor:
    """TIES-merging; with ``generators`` the trim step is DARE's random drop (DARE-TIES).

    The trim thresholds (or DARE's masks) are found over each whole task vector first;
    election and disjoint merge then run over ``chunk`` elements at a time, so the
    scratch memory is a few chunks rather than several copies of the tensor. ``release``
    is called with each slice of the inputs once it has been read (the executor drops
    memory-mapped pages there; the result does not depend on it).
    """
    done = release or (lambda t: None)
    dtype = _work_dtype(base)
    n = base.numel()
    b = base.reshape(-1)
    xs = [t.reshape(-1) for t in tensors]
    cuts: list[tuple[float, int] | None] = []
    keeps: list[torch.Tensor | None] = []
    for i, x in enumerate(xs):
        d = densities[i]
        if generators is not None:
            keeps.append(
                torch.rand(n, generator=generators[i], dtype=torch.float32) < d if d < 1 else None
            )
        elif d < 1:
            mags = torch.empty(n, dtype=dtype)
            for s in range(0, n, chunk):
                torch.sub(
                    x[s : s + chunk].to(dtype), b[s : s + chunk].to(dtype), out=mags[s : s + chunk]
                )
                done(x[s : s + chunk])
                done(b[s : s + chunk])
            cuts.append(_cut(mags.abs_(), d))
            del mags
        else:
            cuts.append(None)
    w = torch.tensor([float(x) for x in weights], dtype=dtype)
    out = torch.empty(n, dtype=dtype)
    ties_left = [c[1] if c is not None else 0 for c in cuts]
    for s in range(0, n, chunk):
        bc = b[s : s + chunk].to(dtype)
        deltas = torch.stack([x[s : s + chunk].to(dtype) - bc for x in xs])  # (n_models, c)
        for t in (b, *xs):
            done(t[s : s + chunk])
        for i in range(len(xs)):
            if generators is not None:
                mask = keeps[i]
                if mask is not None:
                    kept = mask[s : s + chunk]
                    deltas[i] = torch.where(kept, deltas[i] / densities[i], 0.0)
            elif (cut := cuts[i]) is not None:
                keep, ties_left[i] = _keep_mask(deltas[i].abs(), cut[0], ties_left[i])
                deltas[i] *= keep
        deltas.mul_(w.unsqueeze(1))
        sign = elect_sign(deltas)
        out[s : s + chunk] = bc + lam * disjoint_merge(deltas, w, sign, normalize)
    return out.view(base.shape)


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995
) -> torch.Tensor:
    """Spherical linear interpolation of the flattened tensors (linear when parallel).

    ``slerp(t) = sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1`` with ``cos Ω`` the cosine
    of the angle between ``v0`` and ``v1``; the norms of the inputs are kept (not
    normalized away), so two unit vectors interpolate on the unit sphere.
    """
    dtype = _work_dtype(v0)
    a = v0.to(dtype).reshape(-1)
    b = v1.to(dtype).reshape(-1)
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    if na < 1e-8 or nb < 1e-8:
        return ((1 - t) * a + t * b).view(v0.shape)
    dot = float(torch.dot(a / na, b / nb).clamp(-1, 1))
    if abs(dot) > dot_threshold:
        return ((1 - t) * a + t * b).view(v0.shape)
    theta = math.acos(dot)
    s = math.sin(theta)
    return (math.sin((1 - t) * theta) / s * a + math.sin(t * theta) / s * b).view(v0.shape)

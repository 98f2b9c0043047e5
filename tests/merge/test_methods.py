"""Each merge method against its mathematical definition, element by element in float64."""

from __future__ import annotations

import math

import pytest
import torch

from folklm.merge import methods


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_linear_is_the_weighted_average():
    xs = [_rand(4, 5, seed=i) for i in range(3)]
    w = [0.2, 0.5, 1.3]
    want = sum(wi * x for wi, x in zip(w, xs, strict=True)) / sum(w)
    torch.testing.assert_close(methods.linear(xs, w), want)
    torch.testing.assert_close(methods.linear(xs, w, normalize=False), want * sum(w))


def test_linear_refuses_weights_summing_to_zero():
    with pytest.raises(ValueError, match="sum to zero"):
        methods.linear([_rand(3), _rand(3)], [1.0, -1.0])


def test_task_arithmetic_adds_weighted_task_vectors():
    base = _rand(6, 7, seed=10)
    xs = [_rand(6, 7, seed=i) for i in range(2)]
    w = [0.7, -0.3]
    want = base + 0.5 * (w[0] * (xs[0] - base) + w[1] * (xs[1] - base))
    torch.testing.assert_close(methods.task_arithmetic(base, xs, w, lam=0.5), want)


def test_trim_keeps_exactly_the_largest_magnitudes():
    delta = _rand(10, 20, seed=3)
    for density in (0.05, 0.3, 0.5, 0.99):
        out = methods.trim(delta, density)
        k = max(1, int(density * delta.numel()))
        threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
        for d, o in zip(delta.flatten().tolist(), out.flatten().tolist(), strict=True):
            assert o == (d if abs(d) >= threshold else 0.0)
        assert int((out != 0).sum()) == k
    assert methods.trim(delta, 1.0) is delta


def test_elect_sign_element_by_element():
    deltas = _rand(3, 4, 5, seed=4)
    sign = methods.elect_sign(deltas)
    for idx in range(20):
        i, j = divmod(idx, 5)
        total = sum(deltas[m, i, j].item() for m in range(3))
        assert sign[i, j].item() == (1.0 if total >= 0 else -1.0)


def _ties_reference(base, xs, weights, densities, lam=1.0):
    """TIES written out per element in plain Python floats (Yadav et al., 2023, Alg. 1)."""
    n = base.numel()
    trimmed = []
    for x, d in zip(xs, densities, strict=True):
        delta = (x - base).flatten().tolist()
        k = max(1, int(d * n))
        keep = set(sorted(range(n), key=lambda i: -abs(delta[i]))[:k])
        trimmed.append([delta[i] if i in keep else 0.0 for i in range(n)])
    out = []
    for i in range(n):
        vals = [w * t[i] for w, t in zip(weights, trimmed, strict=True)]
        elected = 1.0 if sum(vals) >= 0 else -1.0
        pairs = zip(vals, weights, strict=True)
        agree = [(v, w) for v, w in pairs if v != 0 and math.copysign(1, v) == elected]
        merged = sum(v for v, _ in agree) / sum(w for _, w in agree) if agree else 0.0
        out.append(base.flatten()[i].item() + lam * merged)
    return torch.tensor(out, dtype=torch.float64).view_as(base)


def test_ties_matches_the_per_element_definition():
    base = _rand(5, 6, seed=20)
    xs = [base + _rand(5, 6, seed=i) for i in range(3)]
    weights, densities = [1.0, 0.6, 0.3], [0.5, 0.3, 0.8]
    got = methods.ties(base, xs, weights, densities, lam=0.9)
    torch.testing.assert_close(got, _ties_reference(base, xs, weights, densities, lam=0.9))


def test_ties_disjoint_merge_ignores_the_minority_sign():
    base = torch.zeros(3, dtype=torch.float64)
    xs = [torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, -1.0, -3.0])]
    got = methods.ties(base, [x.double() for x in xs], [1.0, 1.0], [1.0, 1.0])
    # element 0: both agree -> mean 2; element 1: sum +1 elects +, only 2.0 kept;
    # element 2: both negative -> mean -2.
    torch.testing.assert_close(got, torch.tensor([2.0, 2.0, -2.0], dtype=torch.float64))


def test_dare_preserves_the_expectation():
    delta = _rand(200_000, seed=5).abs() + 0.5
    g = torch.Generator().manual_seed(0)
    density = 0.3
    out = methods.dare(delta, density, g)
    kept = out != 0
    # survivors are rescaled by exactly 1/density, the rest dropped
    torch.testing.assert_close(out[kept], delta[kept] / density)
    assert abs(kept.double().mean().item() - density) < 0.005
    # E[out] = delta: the mean ratio is 1 within 5 standard errors
    ratio = out / delta
    stderr = math.sqrt((1 - density) / density / delta.numel())
    assert abs(ratio.mean().item() - 1.0) < 5 * stderr


def test_dare_under_task_arithmetic_and_ties_is_seeded():
    base = _rand(50, 50, seed=1)
    xs = [base + _rand(50, 50, seed=2), base + _rand(50, 50, seed=3)]

    def run(seed):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(2)]
        return methods.ties(base, xs, [1.0, 1.0], [0.4, 0.4], generators=gens)

    torch.testing.assert_close(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    got = methods.task_arithmetic(base, xs, [0.5, 0.5], densities=[0.4, 0.4], generators=gens)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    want = base + sum(0.5 * methods.dare(x - base, 0.4, g) for x, g in zip(xs, gens, strict=True))
    torch.testing.assert_close(got, want)


def test_slerp_is_linear_for_parallel_vectors():
    v0 = _rand(8, 9, seed=6)
    for t in (0.0, 0.25, 0.7, 1.0):
        torch.testing.assert_close(methods.slerp(t, v0, 2.5 * v0), (1 - t) * v0 + t * 2.5 * v0)


def test_slerp_stays_on_the_unit_sphere():
    a = _rand(64, seed=7)
    b = _rand(64, seed=8)
    a, b = a / a.norm(), b / b.norm()
    omega = math.acos(float(a @ b))
    for t in (0.0, 0.1, 0.5, 0.9, 1.0):
        out = methods.slerp(t, a, b)
        assert abs(out.norm().item() - 1.0) < 1e-12
        # the angle to a grows linearly in t
        assert abs(math.acos(float((out @ a).clamp(-1, 1))) - t * omega) < 1e-6
    torch.testing.assert_close(methods.slerp(0.0, a, b), a)
    torch.testing.assert_close(methods.slerp(1.0, a, b), b)
    e1, e2 = torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(methods.slerp(0.5, e1, e2), (e1 + e2) / math.sqrt(2))


def test_chunked_ties_keeps_exactly_k_when_magnitudes_tie():
    """Many equal magnitudes (as in bfloat16 weights): the trim keeps exactly k entries,
    the first tied ones in index order, however the tensor is chunked."""
    g = torch.Generator().manual_seed(9)
    base = torch.zeros(3000, dtype=torch.float64)
    xs = [torch.randint(-3, 4, (3000,), generator=g).double() for _ in range(2)]
    whole = methods.ties(base, xs, [1.0, 1.0], [0.3, 0.6], chunk=1 << 20)
    for chunk in (7, 100, 1024):
        assert torch.equal(methods.ties(base, xs, [1.0, 1.0], [0.3, 0.6], chunk=chunk), whole)
    trimmed = methods.trim(xs[0], 0.3)
    assert int((trimmed != 0).sum()) == int(0.3 * 3000)
    cut = trimmed.abs()[trimmed != 0].min()
    assert (xs[0].abs() > cut).sum() <= int(0.3 * 3000)  # everything larger is kept
    assert torch.equal(trimmed[xs[0].abs() > cut], xs[0][xs[0].abs() > cut])
    tied = (xs[0].abs() == cut).nonzero().flatten()
    kept = (trimmed != 0) & (xs[0].abs() == cut)
    assert kept[tied].tolist() == sorted(kept[tied].tolist(), reverse=True)  # first ones

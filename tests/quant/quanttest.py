"""Helpers shared by the quantization tests."""

from __future__ import annotations

import torch


def gaussian_linear(n_out: int, n_in: int, bias: bool = False, std: float = 0.02):
    """An ``nn.Linear`` with N(0, std^2) weights (roughly how LLM weights are distributed)."""
    lin = torch.nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, std)
        if bias:
            lin.bias.normal_(0, std)
    return lin


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64."""
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def uniform_noise_estimate(steps: torch.Tensor, weight: torch.Tensor) -> float:
    """Relative RMS error of rounding to a grid with these local step sizes, if the error is
    uniform over +-step/2 (variance step^2 / 12): the expected ||W - Q|| / ||W||, and for
    inputs independent of the error also the expected relative output error."""
    rms_w = weight.double().pow(2).mean().sqrt()
    return ((steps.double().pow(2).mean() / 12).sqrt() / rms_w).item()

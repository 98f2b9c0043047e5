"""GPTQ: int4 group-wise quantization that corrects each rounding error on the columns left.

GPTQ (Frantar et al., 2022, arXiv:2210.17323) quantizes a linear layer ``W`` (N, K) so as to
minimise ``||W X - Q X||^2`` over calibration inputs ``X`` (K, n). With ``H = X X^T / n``, the
Optimal Brain Surgeon update says: after rounding column ``i`` (error ``e``), move the columns
not yet rounded by ``-e * Hinv[i, i:] / Hinv[i, i]``. GPTQ processes columns in order using
the upper Cholesky factor of ``H^-1`` (its rows are exactly those update vectors), applies the
updates inside blocks of 128 columns and the rest in one matrix product per block ("lazy
batch updates"), and adds ``damp * mean(diag H)`` to the diagonal for stability. Act-order
(the reference code's ``--act-order``) rounds columns by decreasing ``diag(H)`` first; its
group parameters then come from the unmodified weight ("static groups") so that groups stay
runs of consecutive inputs.

The output is the same codes/scales/zeros format as round-to-nearest int4
(``folklm.kernels.int4``: ``w = s (q - 8) + z``), so the same kernel runs it.

Calibration follows the reference's sequential scheme: the inputs of decoder layer ``l`` are
those produced by the already-quantized layers ``< l``; within a layer every linear sees the
float activations of that layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from folklm.errors import FolkError
from folklm.kernels.base import scale_dtype
from folklm.kernels.int4 import (
    MID,
    Int4Linear,
    check_group_size,
    int4_codes,
    int4_params,
    quantize_int4,
)


@dataclass
class GPTQConfig:
    """GPTQ settings (the reference implementation's defaults)."""

    group_size: int = 128
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    act_order: bool = False
    block_size: int = 128  # columns per lazy batch update
    n_samples: int = 32  # calibration sequences
    seq_len: int = 256  # tokens per calibration sequence


def calibration_batches(
    calibration: str | torch.Tensor | Sequence[Sequence[int]],
    tokenizer=None,
    n_samples: int = 32,
    seq_len: int = 256,
) -> list[torch.Tensor]:
    """Calibration sequences as (1, T) id tensors.

    Text is tokenized and cut into ``n_samples`` windows of ``seq_len`` tokens spread evenly
    over it (fewer if the text is short); ids are used as given (one row per sequence).
    """
    if isinstance(calibration, str):
        if not calibration.strip():
            raise FolkError("calibration text is empty: GPTQ needs some text to calibrate on")
        if tokenizer is None:
            raise FolkError("text calibration needs a tokenizer: pass the LLM, or token ids")
        ids = tokenizer.encode(calibration)
        if len(ids) < 2:
            raise FolkError(f"calibration text gives {len(ids)} token(s); GPTQ needs more text")
        n_windows = max(1, len(ids) // seq_len)
        picks = torch.linspace(0, n_windows - 1, min(n_samples, n_windows)).round().long()
        rows = [ids[i * seq_len : (i + 1) * seq_len] for i in sorted(set(picks.tolist()))]
    elif isinstance(calibration, torch.Tensor):
        rows = calibration.reshape(-1, calibration.shape[-1]).tolist()
    else:
        rows = [list(r) for r in calibration]
    rows = [r for r in rows if len(r) > 0]
    if not rows:
        raise FolkError("calibration data is empty: GPTQ needs some tokens to calibrate on")
    return [torch.tensor([r], dtype=torch.long) for r in rows]


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = 128,
    dtype: torch.dtype | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ for one weight (N, K) given ``H = X X^T / n`` (K, K).

    Returns codes (N, K) uint8 and scales, zeros (N, K/G) in ``dtype`` (default: the weight's).
    """
    N, K = weight.shape
    G = group_size
    check_group_size(name, K, G)
    dtype = scale_dtype(dtype or weight.dtype)
    W = weight.detach().float().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0  # inputs that are always zero: their weights never matter
    H[dead, dead] = 1
    W[:, dead] = 0
    scales = torch.empty(N, K // G, dtype=dtype)
    zeros = torch.empty(N, K // G, dtype=dtype)
    perm = torch.arange(K)
    if act_order:
        # static groups: parameters from the unmodified weight, one per run of G inputs
        wg = W.reshape(N, K // G, G)
        scales[:], zeros[:] = int4_params(wg.amin(-1), wg.amax(-1), dtype)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()  # (K, K)
    except torch.linalg.LinAlgError:
        raise FolkError(
            f"{name or 'linear'}: GPTQ Hessian is not positive definite even with "
            f"damp={damp}; use more calibration text or a larger damp"
        ) from None
    codes = torch.empty(N, K, dtype=torch.uint8)
    B = max(1, block_size // G) * G  # blocks hold whole groups (dynamic group parameters)
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = W[:, i1:i2].clone()  # (N, B), updated as columns are rounded
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // G
            if not act_order and col % G == 0:
                group = W1[:, i : i + G]
                scales[:, g], zeros[:, g] = int4_params(group.amin(1), group.amax(1), dtype)
            s, z = scales[:, g].float(), zeros[:, g].float()
            w = W1[:, i]
            q = int4_codes(w, s, z)
            codes[:, col] = q.to(torch.uint8)
            err = (w - ((q - MID) * s + z)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy batch update
    return codes, scales, zeros


class _Hessians:
    """Accumulates ``X X^T / n`` per linear from forward hooks (shared inputs computed once)."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.H = {n: torch.zeros(m.in_features, m.in_features) for n, m in modules.items()}
        self.n = dict.fromkeys(modules, 0)
        # inputs seen in this batch -> (X^T X, rows); the input is kept alive alongside so
        # that its address cannot be reused by another tensor before the cache is cleared
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(module, inputs, output):
            x = inputs[0].detach()
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)
            if key not in self._cache:
                x2 = x.reshape(-1, x.shape[-1]).float()  # (rows, K)
                self._cache[key] = (x, x2.T @ x2, x2.shape[0])
            _, xtx, rows = self._cache[key]
            self.H[name] += xtx
            self.n[name] += rows

        return hook

    def next_batch(self) -> None:
        self._cache.clear()

    def hessian(self, name: str) -> torch.Tensor:
        return self.H[name] / max(self.n[name], 1)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Captured(Exception):
    pass


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The outermost ``nn.ModuleList`` (the decoder blocks, run in sequence) and its name."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return name, module
    raise FolkError(f"{type(model).__name__}: no decoder layer list found for GPTQ")


def capture_layer_inputs(model: nn.Module, layer: nn.Module, batches: list[torch.Tensor]):
    """The (args, kwargs) ``layer`` is called with for each batch (the model stops there)."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args, kwargs))
        raise _Captured

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(ids)
            except _Captured:
                pass
    finally:
        handle.remove()
    return calls


def gptq_quantize_model(
    model: nn.Module,
    batches: list[torch.Tensor],
    targets: set[str],
    config: GPTQConfig,
    progress: Callable[[str], None] | None = None,
) -> set[str]:
    """Quantize the ``targets`` linears inside the decoder layers with GPTQ, layer by layer,
    swapping in ``Int4Linear`` modules. Returns the names done; other targets are left."""
    prefix, layers = decoder_layers(model)
    done: set[str] = set()
    with torch.no_grad():
        calls = capture_layer_inputs(model, layers[0], _stack(batches))
        for idx, layer in enumerate(layers):
            lp = f"{prefix}.{idx}."
            linears = {
                n: m
                for n, m in layer.named_modules()
                if isinstance(m, nn.Linear) and lp + n in targets
            }
            hessians = _Hessians(linears)
            try:
                for args, kwargs in calls:
                    layer(*args, **kwargs)
                    hessians.next_batch()
            finally:
                hessians.remove()
            for n, lin in linears.items():
                full = lp + n
                if hessians.n[n] == 0:  # e.g. an expert no calibration token was routed to
                    codes, s, z = quantize_int4(lin.weight, config.group_size, lin.weight.dtype)
                else:
                    codes, s, z = gptq_quantize(
                        lin.weight,
                        hessians.hessian(n),
                        config.group_size,
                        damp=config.damp,
                        act_order=config.act_order,
                        block_size=config.block_size,
                        name=full,
                    )
                q = Int4Linear.from_codes(codes, s, z, config.group_size, lin.bias, name=full)
                parent_name, _, child = n.rpartition(".")
                setattr(layer.get_submodule(parent_name) if parent_name else layer, child, q)
                done.add(full)
            # the next layer sees what this quantized layer produces
            calls = [((_first(layer(*a, **kw)), *a[1:]), kw) for a, kw in calls]
            if progress is not None:
                progress(f"GPTQ layer {idx + 1}/{len(layers)}")
    return done


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _stack(batches: list[torch.Tensor], rows: int = 8) -> list[torch.Tensor]:
    """Sequences of equal length stacked into (B <= rows, T) batches: fewer, larger calls."""
    by_len: dict[int, list[torch.Tensor]] = {}
    for b in batches:
        for row in b.reshape(-1, b.shape[-1]):
            by_len.setdefault(row.numel(), []).append(row)
    return [
        torch.stack(same[i : i + rows])
        for same in by_len.values()
        for i in range(0, len(same), rows)
    ]

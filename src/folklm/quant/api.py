"""``quantize(model, scheme)``: swap a model's linear layers for quantized ones, in place.

Model code does not change: every ``nn.Linear`` (the LM head only when asked; MoE routers
never) is replaced by an ``Int8Linear`` / ``Int4Linear`` / ``NF4Linear`` with the same call
(mlx-lm's ``to_quantized()`` protocol). The scheme is recorded on ``model.config`` as a
``quantization_config`` entry (saved into ``config.json``), not guessed from a file name,
so that a saved model loads without re-quantizing (:mod:`folklm.kernels.schemes` rebuilds
it: the loader needs no operation).

Schemes: ``int8`` (per-channel symmetric), ``int4-g{32,64,128}`` (group-wise asymmetric,
round to nearest), ``nf4`` (QLoRA's NormalFloat with double-quantized constants),
``gptq-int4[-g{32,64,128}]`` (GPTQ, group 128 by default; needs calibration text).
Quantize a model loaded with ``folklm.load(..., fast=False)``: ``fast=True`` packs and
fuses the linears of a model the native decode step does not take, and packed layers cannot
be quantized (a Llama-family model keeps plain linears; its native step is rebuilt on the
quantized layers at the next decode step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn

from folklm.config import ModelConfig
from folklm.errors import FolkError
from folklm.kernels.base import QuantizedLinear
from folklm.kernels.int4 import Int4Linear, check_group_size
from folklm.kernels.int8 import Int8Linear
from folklm.kernels.nf4 import NF4Linear
from folklm.kernels.schemes import (
    FORMAT_VERSION,
    HEAD,
    Scheme,
    linears_to_quantize,
    parse_scheme,
    swap_module,
)
from folklm.quant.gptq import (
    GPTQConfig,
    calibration_batches,
    decoder_layers,
    gptq_quantize_model,
)


def _network(model: Any) -> nn.Module:
    """The ``nn.Module`` of an ``LLM`` (anything with ``.model`` and ``.tokenizer``) or itself."""
    if isinstance(model, nn.Module):
        return model
    net = getattr(model, "model", None)
    if isinstance(net, nn.Module):
        return net
    raise FolkError(f"cannot quantize a {type(model).__name__}: expected a model or an LLM")


def _kept(net: nn.Module, names: set[str]) -> list[str]:
    return sorted(n for n, m in net.named_modules() if isinstance(m, nn.Linear) and n not in names)


@contextmanager
def _progress(enabled: bool, total: int, what: str) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda _msg: None
        return

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda msg: bar.update(task, advance=1, description=msg)


def quantize(
    model: Any,
    scheme: str,
    *,
    calibration: str | torch.Tensor | list[list[int]] | None = None,
    keep_embeddings_and_head: bool = True,
    progress: bool = True,
    gptq: GPTQConfig | None = None,
) -> Any:
    """Quantize ``model`` (an ``nn.Module`` or an ``LLM``) in place and return it.

    Args:
        scheme: one of ``SCHEMES``.
        calibration: GPTQ only: text (needs an ``LLM`` for its tokenizer) or token ids.
        keep_embeddings_and_head: keep the LM head in float (embeddings always stay float).
        progress: show a progress bar on stderr.
        gptq: GPTQ settings (damping, act-order, calibration size); the group size comes
            from the scheme.

    Every check on the arguments runs before any layer changes; GPTQ swaps layers as it
    goes, so a failure inside it (e.g. a Hessian that stays singular) leaves the model
    partly quantized: load it again.
    """
    s = parse_scheme(scheme)
    net = _network(model)
    config: ModelConfig | None = getattr(net, "config", None)
    if config is not None and "quantization_config" in config.extra:
        done = config.extra["quantization_config"].get("scheme")
        raise FolkError(f"model is already quantized ({done}); quantize the original model")
    targets = linears_to_quantize(net, set() if not keep_embeddings_and_head else {HEAD})
    if not targets:
        raise FolkError("no nn.Linear layers to quantize in this model")
    if s.group_size is not None:  # fail before any layer is changed
        for name, lin in targets.items():
            check_group_size(name, lin.in_features, s.group_size)
    if s.method != "gptq" and (calibration is not None or gptq is not None):
        raise FolkError(f"scheme {s.name} takes no calibration or GPTQ settings (gptq-int4 does)")
    kept = _kept(net, set(targets))
    quant_config: dict[str, Any] = {
        "quant_method": "folklm",
        "format_version": FORMAT_VERSION,
        "scheme": s.name,
        "bits": 8 if s.method == "int8" else 4,
        "dtype": str(next(iter(targets.values())).weight.dtype).removeprefix("torch."),
        "modules_not_quantized": kept,
    }
    rest = dict(targets)
    if s.method == "gptq":
        if calibration is None:
            raise FolkError(f"scheme {s.name} needs calibration text (or token ids)")
        assert s.group_size is not None  # parse_scheme gives every gptq scheme a group size
        cfg = replace(gptq or GPTQConfig(), group_size=s.group_size)
        batches = calibration_batches(
            calibration, getattr(model, "tokenizer", None), cfg.n_samples, cfg.seq_len
        )
        n_layers = len(decoder_layers(net)[1])
        with _progress(progress, n_layers, f"GPTQ {s.name}") as tick:
            done = gptq_quantize_model(net, batches, set(targets), cfg, tick)
        rest = {n: m for n, m in targets.items() if n not in done}
        quant_config.update(
            group_size=s.group_size,
            damp=cfg.damp,
            act_order=cfg.act_order,
            calibration_tokens=sum(b.numel() for b in batches),
        )
    elif s.method == "int4":
        quant_config["group_size"] = s.group_size
    elif s.method == "nf4":
        quant_config.update(block_size=64, double_quant=True, double_quant_block_size=256)
    with _progress(progress and bool(rest), len(rest), f"quantizing to {s.name}") as tick:
        for name, lin in rest.items():
            swap_module(net, name, _quantize_linear(lin, s, name))
            tick(name)
    if config is not None:
        config.extra["quantization_config"] = quant_config
    return model


def _quantize_linear(lin: nn.Linear, s: Scheme, name: str) -> QuantizedLinear:
    if s.method == "int8":
        return Int8Linear.from_linear(lin)
    if s.method == "nf4":
        return NF4Linear.from_linear(lin)
    assert s.group_size is not None  # parse_scheme gives int4 and gptq schemes a group size
    return Int4Linear.from_linear(lin, s.group_size, name=name)  # int4, or GPTQ's leftovers


# -- saving (loading is folklm.kernels.schemes.load_quantized) -----------------------------


def quantized_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The tensors to save (integer codes, scales, float parameters), by state-dict name.

    A tied LM head that was not quantized is left out (it is the embedding)."""
    net = _network(model)
    if not any(isinstance(m, QuantizedLinear) for m in net.modules()):
        raise FolkError("model is not quantized: call quantize(model, scheme) first")
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    config = getattr(net, "config", None)
    if config is not None and config.tie_word_embeddings and f"{HEAD}.weight" in state:
        del state[f"{HEAD}.weight"]
    return state

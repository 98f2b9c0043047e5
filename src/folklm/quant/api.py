"""``quantize(model, scheme)``: swap a model's linear layers for quantized ones, in place.

Model code does not change: every ``nn.Linear`` (the LM head only when asked; MoE routers
never) is replaced by an ``Int8Linear`` / ``Int4Linear`` / ``NF4Linear`` with the same call
(mlx-lm's ``to_quantized()`` protocol). The scheme is recorded on ``model.config`` as a
``quantization_config`` entry (saved into ``config.json``), not guessed from a file name,
so that a saved model loads without re-quantizing: build the plain model on ``meta``, swap
in empty quantized modules as recorded, assign the saved tensors (``load_quantized``).

Schemes: ``int8`` (per-channel symmetric), ``int4-g{32,64,128}`` (group-wise asymmetric,
round to nearest), ``nf4`` (QLoRA's NormalFloat with double-quantized constants),
``gptq-int4[-g{32,64,128}]`` (GPTQ, group 128 by default; needs calibration text).
Quantize a model loaded with ``folklm.load(..., fast=False)``: ``fast=True`` packs and
fuses its linears for inference, and packed layers cannot be quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from folklm.config import ModelConfig
from folklm.errors import CheckpointError, FolkError
from folklm.kernels.base import QuantizedLinear
from folklm.kernels.int4 import Int4Linear, check_group_size
from folklm.kernels.int8 import Int8Linear
from folklm.kernels.nf4 import NF4Linear
from folklm.models.registry import build_model
from folklm.ops.rope import RotaryEmbedding, inv_frequencies
from folklm.quant.gptq import (
    GPTQConfig,
    calibration_batches,
    decoder_layers,
    gptq_quantize_model,
)

SCHEMES = (
    "int8",
    "int4-g32",
    "int4-g64",
    "int4-g128",
    "nf4",
    "gptq-int4",
    "gptq-int4-g32",
    "gptq-int4-g64",
    "gptq-int4-g128",
)
FORMAT_VERSION = 1
HEAD = "lm_head"
# MoE routers: tiny, and they decide which experts run (llama.cpp keeps them in float too).
_NEVER = (".block_sparse_moe.gate",)


@dataclass(frozen=True)
class Scheme:
    name: str
    method: str  # "int8" | "int4" | "nf4" | "gptq"
    group_size: int | None = None


def parse_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise FolkError(
            f"unknown quantization scheme {name!r}; expected one of: {', '.join(SCHEMES)}"
        )
    if name in ("int8", "nf4"):
        return Scheme(name, name)
    if name == "gptq-int4":
        return Scheme(name, "gptq", 128)
    method = "gptq" if name.startswith("gptq") else "int4"
    return Scheme(name, method, int(name.rsplit("-g", 1)[1]))


def _network(model: Any) -> nn.Module:
    """The ``nn.Module`` of an ``LLM`` (anything with ``.model`` and ``.tokenizer``) or itself."""
    if isinstance(model, nn.Module):
        return model
    net = getattr(model, "model", None)
    if isinstance(net, nn.Module):
        return net
    raise FolkError(f"cannot quantize a {type(model).__name__}: expected a model or an LLM")


def _linears(net: nn.Module, keep: set[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules to quantize, by name; refuses packed or quantized layers."""
    found: dict[str, nn.Linear] = {}
    for name, m in net.named_modules():
        if isinstance(m, QuantizedLinear):
            raise FolkError(
                f"model is already quantized ({name} is {m.scheme}); quantize the original"
            )
        if isinstance(m, nn.Linear):
            if name not in keep and not name.endswith(_NEVER):
                found[name] = m
        elif hasattr(m, "in_features") and hasattr(m, "out_features"):
            raise FolkError(
                f"{name} is a {type(m).__name__}, not an nn.Linear (a model loaded with "
                "fast=True has packed layers); load it with folklm.load(..., fast=False)"
            )
    return found


def _kept(net: nn.Module, names: set[str]) -> list[str]:
    return sorted(n for n, m in net.named_modules() if isinstance(m, nn.Linear) and n not in names)


def _swap(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


@contextmanager
def _progress(enabled: bool, total: int, what: str) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda _msg: None
        return
    from rich.console import Console
    from rich.progress import Progress

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
    targets = _linears(net, set() if not keep_embeddings_and_head else {HEAD})
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
            _swap(net, name, _quantize_linear(lin, s, name))
            tick(name)
    if config is not None:
        config.extra["quantization_config"] = quant_config
    return model


def _quantize_linear(lin: nn.Linear, s: Scheme, name: str) -> QuantizedLinear:
    if s.method == "int8":
        return Int8Linear.from_linear(lin)
    if s.method == "nf4":
        return NF4Linear.from_linear(lin)
    return Int4Linear.from_linear(lin, s.group_size, name=name)  # int4, or GPTQ's leftovers


# -- saving and loading ---------------------------------------------------------------------


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


def _empty(lin: nn.Linear, s: Scheme, qc: dict, state: dict, name: str) -> QuantizedLinear:
    """A quantized module of the recorded scheme with the right shapes, on ``meta``."""
    K, N, bias = lin.in_features, lin.out_features, lin.bias is not None
    if s.method == "int8":
        dtype = state[f"{name}.scales"].dtype
        return Int8Linear(K, N, bias, dtype=dtype, device="meta")
    if s.method == "nf4":
        dq = bool(qc.get("double_quant", True))
        dtype = getattr(torch, str(qc.get("dtype", "float32")))
        return NF4Linear(K, N, bias, double_quant=dq, dtype=dtype, device="meta")
    dtype = state[f"{name}.scales"].dtype
    return Int4Linear(K, N, s.group_size, bias, dtype=dtype, device="meta", name=name)


def load_quantized(
    model: nn.Module, state: dict[str, torch.Tensor], scheme_config: dict, source: str = ""
) -> nn.Module:
    """Load saved quantized tensors into a plain model (typically built on ``meta``).

    Args:
        model: the float architecture, e.g. ``build_model(config, "meta")``.
        state: the saved tensors (``quantized_state_dict``), e.g. memory-mapped safetensors.
        scheme_config: the recorded ``quantization_config``.
        source: file or folder name for error messages.
    """
    where = f"{source}: " if source else ""
    if scheme_config.get("quant_method") != "folklm":
        method = scheme_config.get("quant_method")
        raise CheckpointError(f"{where}quantization_config.quant_method {method!r} is not 'folklm'")
    try:
        s = parse_scheme(str(scheme_config.get("scheme")))
    except FolkError as e:
        raise CheckpointError(f"{where}quantization_config: {e}") from None
    keep = set(scheme_config.get("modules_not_quantized", []))
    for name, lin in _linears(model, keep).items():
        if f"{name}.qweight" not in state:
            raise CheckpointError(f"{where}{name} is quantized per config.json but has no qweight")
        _swap(model, name, _empty(lin, s, scheme_config, state, name))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where}{str(e).strip().splitlines()[-1].strip()}") from None
    config = getattr(model, "config", None)
    tied = (
        config is not None
        and config.tie_word_embeddings
        and isinstance(getattr(model, HEAD, None), nn.Linear)
    )
    missing = [k for k in missing if not (tied and k == f"{HEAD}.weight")]
    if missing or unexpected:
        what = (
            f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
        )
        raise CheckpointError(f"{where}{what} for quantization scheme {s.name}")
    if tied:
        model.tie_weights()
    for m in model.modules():  # non-persistent buffers are still on meta: compute them
        if isinstance(m, RotaryEmbedding) and config is not None:
            m.inv_freq = inv_frequencies(config)
    if config is not None:
        config.extra["quantization_config"] = dict(scheme_config)
    return model.eval()


def materialize_quantized(
    config: ModelConfig, tensors: dict[str, torch.Tensor], source: str = ""
) -> nn.Module:
    """Build ``config``'s model on ``meta`` and load a saved quantized checkpoint into it."""
    qc = config.extra.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{source}: config.json has no quantization_config")
    return load_quantized(build_model(config, "meta"), tensors, qc, source)


def cast_float_parts(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the float parameters and buffers outside the quantized layers to ``dtype``.

    Quantized layers keep their constants as saved (NF4's double-quantized scales lose
    accuracy in bfloat16) and compute in their input's dtype; RoPE frequencies stay
    float32, as in a model loaded in any dtype."""
    inside = {id(q) for m in model.modules() if isinstance(m, QuantizedLinear) for q in m.modules()}
    for m in model.modules():
        if id(m) in inside:
            continue
        keep = isinstance(m, RotaryEmbedding)
        for name, t in list(m.named_parameters(recurse=False)):
            if t.is_floating_point() and t.dtype != dtype:
                m._parameters[name] = nn.Parameter(t.detach().to(dtype), requires_grad=False)
        for name, t in list(m.named_buffers(recurse=False)):
            if t is not None and t.is_floating_point() and t.dtype != dtype and not keep:
                m._buffers[name] = t.to(dtype)
    return model

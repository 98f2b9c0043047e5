"""Quantization schemes and the saved format: rebuild a quantized checkpoint as it was saved.

``folk quantize`` (:mod:`folklm.quant.api`) records its scheme in ``config.json`` as a
``quantization_config`` entry; loading builds the plain model on ``meta``, swaps in empty
quantized modules as recorded and assigns the saved tensors, so nothing is re-quantized.
The loader (:mod:`folklm.engine.llm`) needs only this module, never the quantize operation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, cast

import torch
from torch import nn

from folklm.config import ModelConfig
from folklm.errors import CheckpointError, FolkError
from folklm.kernels.base import QuantizedLinear
from folklm.kernels.int4 import Int4Linear
from folklm.kernels.int8 import Int8Linear
from folklm.kernels.nf4 import NF4Linear
from folklm.models.llama import CausalLM
from folklm.models.registry import build_model
from folklm.ops.rope import RotaryEmbedding, inv_frequencies

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


def linears_to_quantize(net: nn.Module, keep: set[str]) -> dict[str, nn.Linear]:
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


def swap_module(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


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
    assert s.group_size is not None  # parse_scheme gives every int4 and gptq scheme one
    return Int4Linear(K, N, s.group_size, bias, dtype=dtype, device="meta", name=name)


M = TypeVar("M", bound=nn.Module)


def load_quantized(
    model: M, state: dict[str, torch.Tensor], scheme_config: dict, source: str = ""
) -> M:
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
    for name, lin in linears_to_quantize(model, keep).items():
        if f"{name}.qweight" not in state:
            raise CheckpointError(f"{where}{name} is quantized per config.json but has no qweight")
        swap_module(model, name, _empty(lin, s, scheme_config, state, name))
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
    if tied:  # a model with a config: a folklm CausalLM
        cast(CausalLM, model).tie_weights()
    for m in model.modules():  # non-persistent buffers are still on meta: compute them
        if isinstance(m, RotaryEmbedding) and config is not None:
            m.inv_freq = inv_frequencies(config)
    if config is not None:
        config.extra["quantization_config"] = dict(scheme_config)
    return model.eval()


def materialize_quantized(
    config: ModelConfig, tensors: dict[str, torch.Tensor], source: str = ""
) -> CausalLM:
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
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and b.dtype != dtype and not keep:
                m._buffers[name] = b.to(dtype)
    return model

"""Merge recipes: the YAML file of ``folk merge``, parsed into typed dataclasses.

The format is the subset of mergekit's (arcee-ai/mergekit) configuration that folklm
implements, so community recipes run unchanged where the features overlap::

    merge_method: ties            # linear, task_arithmetic, ties, dare_linear, dare_ties,
                                  # slerp, lora_fuse
    base_model: smollm2-135m-instruct       # registry NAME[:TAG] or a folder path
    models:
      - model: ./specialist-a               # "MODEL+ADAPTER" fuses a PEFT LoRA first
        parameters: {weight: 1.0, density: 0.5}
      - model: ./specialist-b
        parameters: {weight: [0.2, 0.8], density: 0.5}   # a list: interpolated by depth
    parameters: {normalize: true, lambda: 1.0}
    dtype: float32
    seed: 0

A parameter is a number, a list of numbers (interpolated across the layers: layer ``i`` of
``L`` sits at ``t = i / (L − 1)``; as in mergekit, the tensors outside the layers —
embeddings, final norm, head — take the value at ``t = 0``), or a list of
``{filter: SUBSTRING, value: ...}`` whose first matching filter applies to a tensor. Every
mistake raises :class:`~folklm.errors.FolkError` with the field's path in the message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from folklm.errors import FolkError

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "lora_fuse")
NEEDS_BASE = {"task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "lora_fuse"}
SPARSE = {"ties", "dare_linear", "dare_ties"}
# Per-model parameters and global ones (with defaults) each method accepts.
MODEL_PARAMS = {
    "linear": {"weight"},
    "task_arithmetic": {"weight"},
    "ties": {"weight", "density"},
    "dare_linear": {"weight", "density"},
    "dare_ties": {"weight", "density"},
    "slerp": set(),
    "lora_fuse": set(),
}
GLOBAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "lambda": 1.0},
    "ties": {"normalize": True, "lambda": 1.0},
    "dare_linear": {"normalize": False, "lambda": 1.0},
    "dare_ties": {"normalize": False, "lambda": 1.0},
    "slerp": {"t": None},
    "lora_fuse": {},
}
BOOL_PARAMS = {"normalize"}
DTYPES = ("float32", "bfloat16", "float16")
TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "seed",
    "adapter",
    "tokenizer_source",
    "name",
}


@dataclass(frozen=True)
class Param:
    """One parameter setting: a number/bool, a list of numbers, or filtered settings."""

    value: Any
    where: str

    def at(self, tensor_name: str, t: float) -> Any:
        """The value for ``tensor_name`` at depth ``t`` in [0, 1] (mergekit's rule)."""
        return _evaluate(self.value, tensor_name, t, self.where)


def _evaluate(value: Any, name: str, t: float, where: str) -> Any:
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for cond in value:
            flt = cond.get("filter")
            if flt in (None, "*") or flt in name:
                return _evaluate(cond["value"], name, t, where)
        return None
    if isinstance(value, list) and value:
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * float(value[i0]) + frac * float(value[i1])
    raise FolkError(f"{where}: unexpected value {value!r}")


@dataclass(frozen=True)
class InputModel:
    """``ref`` is a registry name or path; ``adapter`` a PEFT folder fused into it first."""

    ref: str
    adapter: str | None = None
    parameters: dict[str, Param] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.ref + (f"+{self.adapter}" if self.adapter else "")


@dataclass(frozen=True)
class MergeConfig:
    method: str
    base: InputModel | None
    models: list[InputModel]  # the non-base inputs, in order
    parameters: dict[str, Param]
    dtype: str = "float32"
    out_dtype: str | None = None
    seed: int = 0
    raw: dict[str, Any] = field(default_factory=dict)

    def inputs(self) -> list[InputModel]:
        """Every model read, base first."""
        return ([self.base] if self.base is not None else []) + self.models

    def param(self, model: InputModel | None, key: str) -> Param | None:
        """A model's own setting, else the global one, else None."""
        if model is not None and key in model.parameters:
            return model.parameters[key]
        return self.parameters.get(key)


def _split_ref(text: Any, where: str) -> tuple[str, str | None]:
    if not isinstance(text, str) or not text.strip():
        raise FolkError(f"{where}: expected a registry name or a path, got {text!r}")
    ref, plus, adapter = text.strip().partition("+")
    if plus and (not ref or not adapter):
        raise FolkError(f"{where}: expected MODEL+ADAPTER, got {text!r}")
    return ref, adapter or None


def _check_number(value: Any, where: str, key: str) -> None:
    def bad(v: Any) -> bool:
        return (
            isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v)
        )

    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, cond in enumerate(value):
            extra = set(cond) - {"filter", "value"}
            if "value" not in cond or extra:
                raise FolkError(f"{where}[{i}]: expected {{filter, value}}, got {cond!r}")
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise FolkError(f"{where}[{i}].filter: expected a string")
            _check_number(cond["value"], f"{where}[{i}].value", key)
        return
    values = value if isinstance(value, list) and value else [value]
    for v in values:
        if bad(v):
            raise FolkError(f"{where}: {key} must be a number or a list of numbers, got {v!r}")
        if key == "density" and not 0 < v <= 1:
            raise FolkError(f"{where}: density must be in (0, 1], got {v!r}")
        if key == "t" and not 0 <= v <= 1:
            raise FolkError(f"{where}: t must be in [0, 1], got {v!r}")


def _params(data: Any, allowed: set[str], where: str) -> dict[str, Param]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FolkError(f"{where}: expected a mapping of parameters, got {data!r}")
    out: dict[str, Param] = {}
    for key, value in data.items():
        here = f"{where}.{key}"
        if key not in allowed:
            raise FolkError(f"{here}: unknown parameter (expected one of {sorted(allowed)})")
        if key in BOOL_PARAMS:
            if not isinstance(value, bool):
                raise FolkError(f"{here}: expected true or false, got {value!r}")
        else:
            _check_number(value, here, key)
        out[key] = Param(value, here)
    return out


def parse_config(data: Any, source: str = "merge config") -> MergeConfig:
    """Validate a loaded YAML document; errors name ``source`` and the field."""
    if not isinstance(data, dict):
        raise FolkError(f"{source}: expected a YAML mapping at the top level")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        hint = " (folklm merges whole models: use 'models')" if unknown[0] == "slices" else ""
        raise FolkError(f"{source}: {unknown[0]}: unknown field{hint}")
    method = data.get("merge_method")
    if method not in METHODS:
        raise FolkError(
            f"{source}: merge_method: unknown method {method!r} (choose from {', '.join(METHODS)})"
        )
    dtype = data.get("dtype", "float32")
    out_dtype = data.get("out_dtype")
    for key, val in (("dtype", dtype), ("out_dtype", out_dtype)):
        if val is not None and val not in DTYPES:
            raise FolkError(f"{source}: {key}: expected one of {', '.join(DTYPES)}, got {val!r}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FolkError(f"{source}: seed: expected an integer, got {seed!r}")
    if data.get("tokenizer_source") not in (None, "base"):
        raise FolkError(f"{source}: tokenizer_source: only 'base' is supported")
    allowed_global = set(GLOBAL_DEFAULTS[method]) | MODEL_PARAMS[method]
    parameters = _params(data.get("parameters"), allowed_global, f"{source}: parameters")

    base = None
    if data.get("base_model") is not None and method != "linear":  # linear needs no base
        ref, adapter = _split_ref(data["base_model"], f"{source}: base_model")
        base = InputModel(ref, adapter)
    elif method in NEEDS_BASE:
        raise FolkError(f"{source}: base_model: required by merge_method {method}")

    raw_models = data.get("models")
    if method == "lora_fuse":
        return _lora_fuse(data, source, base, parameters, dtype, out_dtype, seed)
    if not isinstance(raw_models, list) or not raw_models:
        raise FolkError(f"{source}: models: expected a non-empty list of {{model: ...}}")
    models: list[InputModel] = []
    for i, item in enumerate(raw_models):
        where = f"{source}: models[{i}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item:
            raise FolkError(f"{where}: expected a mapping with a 'model' field, got {item!r}")
        extra = set(item) - {"model", "parameters"}
        if extra:
            raise FolkError(f"{where}.{sorted(extra)[0]}: unknown field")
        ref, adapter = _split_ref(item["model"], f"{where}.model")
        params = _params(item.get("parameters"), MODEL_PARAMS[method], f"{where}.parameters")
        model = InputModel(ref, adapter, params)
        if base is not None and (ref, adapter) == (base.ref, base.adapter):
            continue  # mergekit lists the base among the models too
        models.append(model)
    if not models:
        raise FolkError(f"{source}: models: no model besides the base model to merge")
    if method == "slerp":
        if len(models) != 1:
            raise FolkError(
                f"{source}: models: slerp interpolates the base model and exactly one other "
                f"model, got {len(models)} others"
            )
        if "t" not in parameters:
            raise FolkError(f"{source}: parameters.t: required by slerp")
    for i, m in enumerate(models):
        for key in ("weight",) if method != "slerp" else ():
            if key in MODEL_PARAMS[method] and m.parameters.get(key) is None:
                if key not in parameters:
                    raise FolkError(f"{source}: models[{i}].parameters.{key}: required")
    for i, m in enumerate(models):
        if method in SPARSE and "density" not in m.parameters and "density" not in parameters:
            raise FolkError(f"{source}: models[{i}].parameters.density: required by {method}")
    return MergeConfig(method, base, models, parameters, dtype, out_dtype, seed, dict(data))


def _lora_fuse(data, source, base, parameters, dtype, out_dtype, seed) -> MergeConfig:
    adapter = data.get("adapter")
    if not isinstance(adapter, str) or not adapter:
        raise FolkError(f"{source}: adapter: lora_fuse needs the adapter folder's path")
    if base.adapter:
        raise FolkError(f"{source}: base_model: give the adapter in 'adapter', not with '+'")
    if data.get("models"):
        raise FolkError(f"{source}: models: lora_fuse takes base_model and adapter only")
    fused = InputModel(base.ref, adapter)
    return MergeConfig("lora_fuse", None, [fused], parameters, dtype, out_dtype, seed, dict(data))


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a YAML recipe file."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FolkError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FolkError(f"{p}: cannot read ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise FolkError(f"{p}: not valid YAML{at} ({first})") from None
    return parse_config(data, str(p))

"""Fine-tuning recipes: one typed dataclass, loaded from YAML, overridden by ``key=value``.

As torchtune's recipes, every hyper-parameter of a run lives in one place and is recorded
whole with the model it made; unlike them, the fields are typed dataclass fields (no
dotted-path instantiation), checked when the recipe is built.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from folklm.errors import FolkError

METHODS = ("lora", "qlora", "dora", "full", "dpo")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class Recipe:
    """Every setting of a ``folk tune`` run (defaults: ``folk tune --print-config``)."""

    method: str = "lora"
    # adapter (LoRA, QLoRA, DoRA; DPO trains a LoRA adapter too)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    use_rslora: bool = False
    # data
    max_seq_len: int = 512
    truncate: bool = True  # False: drop too-long examples
    pack: bool = False
    eval_fraction: float = 0.1
    eval_max_examples: int = 64
    # optimisation (AdamW, Loshchilov & Hutter, arXiv:1711.05101)
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 10
    max_steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    bf16: bool = False  # autocast matmuls to bfloat16 (weights and optimizer stay fp32)
    activation_checkpointing: bool = False
    seed: int = 0
    # bookkeeping
    eval_every: int = 50
    save_every: int = 50
    log_every: int = 1
    # DPO (Rafailov et al., 2023, arXiv:2305.18290)
    dpo_beta: float = 0.1
    # distributed: data-parallel wrapper under torchrun (ddp; fsdp is refused, see validate)
    parallel: str = "ddp"

    def validate(self) -> Recipe:
        def bad(key: str, why: str) -> FolkError:
            return FolkError(f"recipe: {key}={getattr(self, key)!r} {why}")

        if self.method not in METHODS:
            raise bad("method", f"is not one of: {', '.join(METHODS)}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"is not one of: {', '.join(SCHEDULES)}")
        if self.parallel == "fsdp":  # refused in one process too: never silently ignored
            raise bad(
                "parallel",
                "is not supported: PyTorch's FSDP needs a GPU and folklm trains on the CPU; "
                "use parallel=ddp (under torchrun)",
            )
        if self.parallel != "ddp":
            raise bad("parallel", "is not one of: ddp")
        for key in ("lora_rank", "max_seq_len", "max_steps", "batch_size", "grad_accum"):
            if getattr(self, key) <= 0:
                raise bad(key, "must be > 0")
        for key in ("eval_every", "save_every", "log_every"):
            if getattr(self, key) <= 0:
                raise bad(key, "must be > 0")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "must be >= 0")
        if not 0 <= self.eval_fraction < 1:
            raise bad("eval_fraction", "must be in [0, 1)")
        if not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "must be in [0, 1)")
        if self.lr <= 0:
            raise bad("lr", "must be > 0")
        if not self.target_modules:
            raise bad("target_modules", "must name at least one module (or all-linear)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(Recipe)
    return {f.name: hints[f.name] for f in fields(Recipe)}


def _convert(key: str, value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (list, typing.List):  # noqa: UP006
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise FolkError(f"{where}: {key} must be a list of names, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise FolkError(f"{where}: {key} must be true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise FolkError(f"{where}: {key} must be a number, got {value!r}")
        try:
            number = float(value) if kind is float else int(str(value), 0)
        except ValueError:
            raise FolkError(f"{where}: {key} must be {kind.__name__}, got {value!r}") from None
        return number
    return str(value)


def build_recipe(
    config: str | Path | None = None,
    overrides: Sequence[str] | dict[str, Any] = (),
    method: str | None = None,
) -> Recipe:
    """Defaults <- YAML file <- ``--method`` <- ``key=value`` overrides, then validated.

    Raises:
        FolkError: unreadable YAML, an unknown key (the valid keys are listed), a value of
            the wrong type, or a value out of range.
    """
    types_ = _field_types()
    values: dict[str, Any] = {}

    def put(key: str, value: Any, where: str) -> None:
        if key not in types_:
            raise FolkError(f"{where}: unknown setting {key!r}; valid: {', '.join(types_)}")
        values[key] = _convert(key, value, types_[key], where)

    if config is not None:
        path = Path(config)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise FolkError(f"{path}: cannot read recipe ({' '.join(str(exc).split())})") from None
        if not isinstance(data, dict):
            raise FolkError(f"{path}: a recipe must be a mapping of key: value")
        for key, value in data.items():
            put(str(key), value, str(path))
    if method is not None:
        put("method", method, "--method")
    items: Iterable[tuple[str, Any]] | None = (
        overrides.items() if isinstance(overrides, dict) else None
    )
    if items is None:
        pairs: list[tuple[str, Any]] = []
        for text in overrides:
            if "=" not in text:
                raise FolkError(f"override {text!r} is not key=value")
            key, _, value = text.partition("=")
            pairs.append((key.strip(), value))
        items = pairs
    for key, value in items:
        put(key, value, "override")
    return dataclasses.replace(Recipe(), **values).validate()

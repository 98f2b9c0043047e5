"""PEFT adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

The on-disk format of Hugging Face PEFT (https://github.com/huggingface/peft), so an
adapter trained by folklm loads in PEFT and vice versa. Tensor names are the base
model's module names behind PEFT's ``base_model.model.`` prefix, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (shape ``(r, in)``)
and ``...lora_B.weight`` (shape ``(out, r)``); DoRA adds ``...lora_magnitude_vector``
(shape ``(out,)``).

LoRA (Hu et al., 2021, arXiv:2106.09685): ``W' = W + s * B @ A`` with ``s = alpha / r``,
or ``alpha / sqrt(r)`` for rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732).
DoRA (Liu et al., 2024, arXiv:2402.09353): ``W' = m * V / ||V||_c`` with
``V = W + s * B @ A`` and ``||.||_c`` the norm of each output row.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from folklm.errors import FolkError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


@dataclass
class AdapterConfig:
    """The fields of PEFT's ``LoraConfig`` that change the maths, plus provenance."""

    r: int
    lora_alpha: float
    target_modules: list[str]
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    modules_to_save: list[str] | None = None
    peft_type: str = "LORA"
    task_type: str = "CAUSAL_LM"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out.update(self.extra)
        out["target_modules"] = sorted(self.target_modules)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = CONFIG_NAME) -> AdapterConfig:
        peft_type = str(data.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise FolkError(f"{where}: peft_type {peft_type!r} is not supported (only LORA)")
        for key in ("r", "lora_alpha", "target_modules"):
            if key not in data:
                raise FolkError(f"{where}: missing field '{key}'")
        r = data["r"]
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise FolkError(f"{where}: field 'r' must be a positive integer, got {r!r}")
        alpha = data["lora_alpha"]
        if not isinstance(alpha, int | float) or isinstance(alpha, bool):
            raise FolkError(f"{where}: field 'lora_alpha' must be a number, got {alpha!r}")
        targets = data["target_modules"]
        if isinstance(targets, str):
            targets = [targets]
        if data.get("fan_in_fan_out"):
            raise FolkError(f"{where}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(
            r=r,
            lora_alpha=float(alpha),
            target_modules=list(targets),
            lora_dropout=float(data.get("lora_dropout") or 0.0),
            use_rslora=bool(data.get("use_rslora", False)),
            use_dora=bool(data.get("use_dora", False)),
            bias=str(data.get("bias", "none")),
            base_model_name_or_path=data.get("base_model_name_or_path"),
            modules_to_save=data.get("modules_to_save"),
            peft_type=peft_type,
            task_type=str(data.get("task_type") or "CAUSAL_LM"),
            extra={k: v for k, v in data.items() if k not in known},
        )


@dataclass
class LoraWeights:
    """One adapted linear: ``A`` ``(r, in)``, ``B`` ``(out, r)``, DoRA magnitude ``(out,)``."""

    A: torch.Tensor
    B: torch.Tensor
    magnitude: torch.Tensor | None = None


@dataclass
class Adapter:
    config: AdapterConfig
    layers: dict[str, LoraWeights]  # HF module name (no PEFT prefix) -> weights
    path: Path | None = None


def is_adapter_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file()


def _split_key(key: str) -> tuple[str, str] | None:
    """``base_model.model.X.lora_A.weight`` -> (``X``, ``A``); other keys -> None."""
    name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    for suffix, part in (
        (".lora_A.weight", "A"),
        (".lora_B.weight", "B"),
        (".lora_A.default.weight", "A"),
        (".lora_B.default.weight", "B"),
        (".lora_magnitude_vector", "m"),
        (".lora_magnitude_vector.weight", "m"),
        (".lora_magnitude_vector.default.weight", "m"),
    ):
        if name.endswith(suffix):
            return name[: -len(suffix)], part
    return None


def load_adapter(path: str | os.PathLike, *, allow_pickle: bool = False) -> Adapter:
    """Read a PEFT LoRA/DoRA adapter folder.

    Raises:
        FolkError: missing or malformed config, pickled weights without ``allow_pickle``,
            tensors that do not pair up or disagree with ``r``.
    """
    folder = Path(path)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FolkError(f"{folder}: not a PEFT adapter (no {CONFIG_NAME})")
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FolkError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FolkError(f"{cfg_path}: expected a JSON object")
    config = AdapterConfig.from_json(data, str(cfg_path))
    tensors = _read_tensors(folder, allow_pickle)
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        split = _split_key(key)
        if split is None:
            continue  # modules_to_save copies and biases are handled by the caller
        pieces.setdefault(split[0], {})[split[1]] = value
    layers: dict[str, LoraWeights] = {}
    for name, parts in sorted(pieces.items()):
        if "A" not in parts or "B" not in parts:
            raise FolkError(f"{folder / WEIGHTS_NAME}: '{name}' has lora_A or lora_B missing")
        A, B = parts["A"], parts["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != config.r or B.shape[1] != config.r:
            raise FolkError(
                f"{folder / WEIGHTS_NAME}: '{name}' lora_A {tuple(A.shape)} / lora_B "
                f"{tuple(B.shape)} do not match r={config.r}"
            )
        layers[name] = LoraWeights(A, B, parts.get("m"))
    if not layers:
        raise FolkError(f"{folder}: the adapter holds no LoRA tensors")
    return Adapter(config, layers, folder)


def _read_tensors(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st = folder / WEIGHTS_NAME
    if st.is_file():
        try:
            return load_file(str(st))
        except (SafetensorError, OSError) as exc:
            raise FolkError(f"{st}: not a readable safetensors file ({exc})") from None
    pk = folder / PICKLE_NAME
    if pk.is_file():
        if not allow_pickle:
            raise FolkError(
                f"{pk}: pickled weights can run code when loaded; convert to safetensors or "
                "allow pickles explicitly (they are then loaded with weights_only=True)"
            )
        return torch.load(pk, map_location="cpu", weights_only=True)
    raise FolkError(f"{folder}: no {WEIGHTS_NAME}")


def save_adapter(
    path: str | os.PathLike,
    config: AdapterConfig,
    layers: dict[str, LoraWeights],
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``layers`` as a PEFT adapter folder (tensors contiguous, names PEFT's)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, w in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = w.A.detach().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = w.B.detach().contiguous()
        if w.magnitude is not None:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = w.magnitude.detach().contiguous()
    tensors.update({k: v.detach().contiguous() for k, v in (extra_tensors or {}).items()})
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    return folder


def fused_weight(weight: torch.Tensor, lora: LoraWeights, scaling: float) -> torch.Tensor:
    """The merged weight ``W'`` (LoRA, or DoRA when a magnitude is present), in fp32 maths."""
    w = weight.float()
    v = w + scaling * (lora.B.float() @ lora.A.float())  # (out, in)
    if lora.magnitude is None:
        return v.to(weight.dtype)
    norm = v.norm(p=2, dim=1, keepdim=True)  # (out, 1): DoRA's column norm in PEFT's layout
    return (lora.magnitude.float().unsqueeze(1) * v / norm).to(weight.dtype)

"""The models a merge reads: resolved, memory-mapped, checked against each other.

Inputs are Hugging Face folders (a path, or a registry entry resolved through the local
hub). Their safetensors are memory-mapped (:mod:`folklm.checkpoint.safetensors_io`), so
opening three models costs no memory until a tensor is touched; after use a tensor's file
pages are dropped again (:func:`~folklm.checkpoint.safetensors_io.release_pages`). An input
written ``MODEL+ADAPTER`` fuses a PEFT LoRA/DoRA adapter into each target weight as it is
read (:func:`folklm.checkpoint.peft.fused_weight`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from folklm.checkpoint.hf import read_json, read_weights
from folklm.checkpoint.peft import Adapter, fused_weight, is_adapter_dir, load_adapter
from folklm.checkpoint.safetensors_io import release_pages
from folklm.errors import FolkError
from folklm.hub.names import parse_ref
from folklm.hub.resolve import resolve
from folklm.merge.config import InputModel

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class OpenModel:
    """One input: its folder, registry name (None for a path), config and mapped tensors."""

    spec: InputModel
    folder: Path
    registry: str | None
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    adapter: Adapter | None = None

    @property
    def label(self) -> str:
        return self.spec.label

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, with the adapter fused in where it targets it."""
        t = self.tensors[name]
        if self.adapter is not None and name.endswith(".weight"):
            lora = self.adapter.layers.get(name[: -len(".weight")])
            if lora is not None:
                return fused_weight(t.float(), lora, self.adapter.config.scaling)
        return t

    def release(self, name: str) -> None:
        release_pages(self.tensors[name])


def _locate(ref: str, where: str) -> tuple[Path, str | None]:
    try:
        src = resolve(ref)
    except FolkError as e:
        raise FolkError(f"{where}: {e}") from None
    path = src.path
    if not path.exists():
        raise FolkError(f"{where}: {ref}: no such file or folder")
    registry = str(parse_ref(src.name)) if src.name is not None else None
    if path.suffix.lower() == ".gguf":
        raise FolkError(
            f"{where}: {ref} is a GGUF file: merging reads Hugging Face safetensors folders of "
            "float weights; import or convert the original float model instead"
        )
    if not path.is_dir():
        raise FolkError(f"{where}: {ref}: not a Hugging Face model folder")
    return path, registry


def open_model(spec: InputModel, where: str) -> OpenModel:
    folder, registry = _locate(spec.ref, where)
    if is_adapter_dir(folder):
        raise FolkError(
            f"{where}: {spec.ref} is a PEFT adapter, not a model; write BASE+{spec.ref}"
        )
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    if config is None:
        raise FolkError(f"{where}: {spec.ref}: no config.json (not a Hugging Face model folder)")
    if config.get("quantization_config"):
        raise FolkError(f"{where}: {spec.ref} holds quantized weights; merge float models")
    tensors = {k: v for k, v in read_weights(folder).items() if not k.endswith(_IGNORED_SUFFIXES)}
    adapter = None
    if spec.adapter is not None:
        apath = Path(spec.adapter).expanduser()
        if not is_adapter_dir(apath):
            raise FolkError(f"{where}: {spec.adapter}: not a PEFT adapter folder")
        adapter = load_adapter(apath)
        if adapter.config.modules_to_save:
            raise FolkError(f"{where}: {spec.adapter}: modules_to_save is not supported")
        if adapter.config.bias != "none":
            raise FolkError(f"{where}: {spec.adapter}: trained biases are not supported")
        for module, lora in adapter.layers.items():
            w = tensors.get(f"{module}.weight")
            if w is None:
                raise FolkError(
                    f"{where}: adapter {spec.adapter} targets '{module}', which {spec.ref} lacks"
                )
            if (lora.B.shape[0], lora.A.shape[1]) != tuple(w.shape):
                raise FolkError(
                    f"{where}: adapter {spec.adapter} '{module}' is "
                    f"{lora.B.shape[0]}x{lora.A.shape[1]}, the weight is {tuple(w.shape)}"
                )
    return OpenModel(spec, folder, registry, config, tensors, adapter)


def check_compatible(ref: OpenModel, other: OpenModel) -> None:
    """Same architecture, same tensor names and shapes; else name the first mismatch."""
    for key in ("model_type", "architectures"):
        a, b = ref.config.get(key), other.config.get(key)
        if a != b:
            raise FolkError(
                f"{other.label}: different architecture: {key} is {b!r}, {ref.label} has {a!r}"
            )
    for name, t in ref.tensors.items():
        o = other.tensors.get(name)
        if o is None:
            raise FolkError(f"{other.label}: missing tensor '{name}' (present in {ref.label})")
        if tuple(o.shape) != tuple(t.shape):
            raise FolkError(
                f"tensor '{name}': shape {tuple(t.shape)} in {ref.label} but "
                f"{tuple(o.shape)} in {other.label}"
            )
    extra = [n for n in other.tensors if n not in ref.tensors]
    if extra:
        raise FolkError(f"{other.label}: unexpected tensor '{extra[0]}' (not in {ref.label})")


def vocabulary(folder: Path) -> dict[str, int] | None:
    """Token -> id of a folder's ``tokenizer.json`` (added tokens included), None if absent."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None

    try:
        return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise FolkError(f"{path}: cannot read the tokenizer ({e})") from None


def check_vocabularies(models: list[OpenModel]) -> None:
    """Refuse inputs whose vocabularies differ (the same id must mean the same token)."""
    seen: tuple[OpenModel, dict[str, int]] | None = None
    for m in models:
        vocab = vocabulary(m.folder)
        if vocab is None:
            continue
        if seen is None:
            seen = (m, vocab)
            continue
        first, ref = seen
        if vocab != ref:
            diff = sorted(set(vocab.items()) ^ set(ref.items()))
            token, idx = diff[0]
            raise FolkError(
                f"{m.label}: tokenizer differs from {first.label}'s (token {token!r} / id "
                f"{idx} not shared); merging needs identical vocabularies"
            )


def depth(name: str, num_layers: int) -> float:
    """mergekit's position of a tensor in [0, 1]: layer ``i`` at ``i / (L − 1)`` (1 when
    ``L`` is 1); tensors outside the layers (embeddings, final norm, head) at 0."""
    m = _LAYER.search(name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0

"""Hugging Face model folders: read, materialise into a model, and write.

A folder holds ``config.json``, weights as ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, ``generation_config.json`` and the tokenizer files. The
model is built on the ``meta`` device and the memory-mapped tensors are assigned into it
(``load_state_dict(assign=True)``), so loading costs no second copy of the weights.

Pickled ``*.bin`` weights are refused by default: unpickling a stranger's file can run
arbitrary code. ``allow_pickle=True`` loads them with ``torch.load(weights_only=True)``,
which only rebuilds tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from folklm.checkpoint.safetensors_io import load_safetensors, release_pages, save_safetensors
from folklm.config import ModelConfig
from folklm.errors import CheckpointError
from folklm.models.llama import CausalLM
from folklm.models.registry import build_model
from folklm.ops.rope import RotaryEmbedding, inv_frequencies

# Keys some checkpoints carry that are recomputed rather than loaded.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_weights(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a folder, memory-mapped; refuses pickles unless allowed."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return load_safetensors(single)
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: missing 'weight_map'")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = folder / shard
            if Path(shard).name != shard:
                raise CheckpointError(f"{index}: shard name {shard!r} is not a plain file name")
            tensors.update(load_safetensors(shard_path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index}: tensor {missing[0]!r} is listed but in no shard")
        return tensors
    others = sorted(folder.glob("*.safetensors"))
    if others:
        tensors = {}
        for p in others:
            tensors.update(load_safetensors(p))
        return tensors
    pickles = sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("*.bin"))
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"{folder}: only pickled weights ({pickles[0].name}) found; pickles can run code "
                "when loaded, so they are refused: convert to safetensors, or pass "
                "--allow-pickle to load them with torch.load(weights_only=True)"
            )
        tensors = {}
        for p in pickles:
            try:
                tensors.update(torch.load(p, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
                raise CheckpointError(f"{p}: cannot load pickled weights ({e})") from None
        return tensors
    raise CheckpointError(f"{folder}: no weights found (expected model.safetensors)")


def materialize(
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    source: str,
) -> CausalLM:
    """Build the model on ``meta`` and assign ``tensors`` (cast to ``dtype``) into it."""
    model = build_model(config, "meta")
    expected = model.state_dict()
    state = {}
    for name, t in tensors.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} for {config.model_type}")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(t.shape)}, "
                f"config expects {tuple(expected[name].shape)}"
            )
        if t.dtype == dtype:
            state[name] = t
        else:  # a converted copy: the file pages of the original are no longer needed
            state[name] = t.to(dtype)
            release_pages(t)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight")
    missing = [n for n in expected if n not in state]
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for m in model.modules():  # non-persistent buffers are still on meta: compute them
        if isinstance(m, RotaryEmbedding):
            m.inv_freq = inv_frequencies(config)
    return model.eval()


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder)")
    return ModelConfig.from_file(path)


def read_generation_config(folder: Path) -> dict:
    path = folder / "generation_config.json"
    return read_json(path) if path.is_file() else {}


def save_folder(
    folder: str | os.PathLike,
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    tokenizer_files: dict[str, str],
    generation_config: dict,
) -> Path:
    """Write a Hugging Face folder atomically (a temp folder renamed into place).

    Args:
        tokenizer_files: file name -> text (``tokenizer.json``, ``tokenizer_config.json``).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tensors = dict(tensors)
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
        for name, text in tokenizer_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder

"""What a model folder or GGUF file holds, read from headers only (no torch, no tensors).

The hub lists architecture, parameter count and quantization for every entry. For a
Hugging Face folder they come from ``config.json`` and the safetensors headers (8-byte
length + JSON, see https://huggingface.co/docs/safetensors); for a GGUF file from its
metadata and tensor infos (``gguf.GGUFReader``, memory-mapped). Reading a 100 GB model
this way touches a few kilobytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from folklm.errors import FolkError

# Files that are never part of a model: VCS and OS litter, partial downloads.
_SKIP_NAMES = {".DS_Store", "Thumbs.db"}
_SKIP_SUFFIXES = (".lock", ".incomplete", ".tmp", ".part")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_ST_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}
_ST_DTYPES |= {"F8_E4M3", "F8_E5M2", "U16", "U32", "U64"}


@dataclass
class ModelInfo:
    """A model on disk, as the hub records it.

    Attributes:
        format: ``hf`` (config.json + weights), ``adapter`` (PEFT adapter folder) or
            ``gguf``.
        files: relative path in the entry -> file on disk.
        architecture: ``config.json`` ``model_type`` or the GGUF ``general.architecture``.
        parameters: number of weights (elements of all tensors).
        quantization: e.g. ``Q4_K_M`` (GGUF file type), ``gptq-4bit``, or the weights'
            dtype (``F32``, ``BF16``) when not quantized.
        config: ``config.json``, or the GGUF's architecture keys and ``general.*`` fields.
        gguf_metadata: all GGUF metadata but the vocabulary (for licence detection and
            to carry into exports); empty for folders.
    """

    format: str
    files: dict[str, Path]
    architecture: str | None
    parameters: int | None
    quantization: str | None
    config: dict[str, Any]
    gguf_metadata: dict[str, Any] = field(default_factory=dict)


def inspect_path(path: Path, *, confine: bool = True) -> ModelInfo:
    """Describe the model at ``path`` (a Hugging Face folder or a ``.gguf`` file).

    ``confine``: see :func:`collect_files` (symlinks must stay inside the folder).

    Raises:
        FolkError: the path does not exist or is not a model.
    """
    if not path.exists():
        raise FolkError(f"{path}: no such file or folder")
    if path.is_dir():
        return _inspect_folder(path, confine)
    if path.is_file() and _is_gguf(path):
        return _inspect_gguf(path)
    raise FolkError(
        f"{path}: not a model (expected a Hugging Face folder with config.json and weights, "
        "or a .gguf file)"
    )


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _allowed_root(folder: Path) -> Path:
    """Where the files of ``folder`` may live: the folder itself, or for a Hugging Face cache
    snapshot (``models--ORG--NAME/snapshots/REV``) the repository folder, whose ``blobs/``
    its links point into."""
    real = folder.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def collect_files(folder: Path, *, confine: bool = True) -> dict[str, Path]:
    """Every regular file under ``folder`` (symlinks followed, as in a Hugging Face cache
    snapshot), except hidden files and folders (``.git``, ``.cache``) and partial
    downloads.

    Args:
        confine: refuse a symlink that resolves outside the folder (or outside the cache
            repository of a snapshot): a ``README.md -> ~/secret`` would otherwise be
            stored in the hub. Off only for staging folders of links the caller named.

    Raises:
        FolkError: a symlink out of the folder, or a symlink loop.
    """
    root_real = _allowed_root(folder)
    files: dict[str, Path] = {}
    seen: set[tuple[int, int]] = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:
            rel = Path(root).relative_to(folder).as_posix()
            raise FolkError(f"{folder}: {rel} is a symlink loop (a folder seen twice); refused")
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in dirs:
            _check_inside(folder, Path(root) / d, root_real, confine)
        for name in sorted(names):
            if name.startswith(".") or name in _SKIP_NAMES or name.endswith(_SKIP_SUFFIXES):
                continue
            p = Path(root) / name
            if p.is_file():
                _check_inside(folder, p, root_real, confine)
                files[p.relative_to(folder).as_posix()] = p
    return files


def _check_inside(folder: Path, p: Path, root_real: Path, confine: bool) -> None:
    if not confine or not p.is_symlink():
        return
    real = p.resolve()
    if real != root_real and root_real not in real.parents:
        rel = p.relative_to(folder).as_posix()
        raise FolkError(
            f"{folder}: {rel} is a symlink to a path outside the imported folder; refused "
            "(copy the file into the folder if it belongs to the model)"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FolkError(f"{path}: not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise FolkError(f"{path}: expected a JSON object")
    return data


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (without ``__metadata__``)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else size
        if n > size - 8 or n > 100_000_000:
            raise FolkError(f"{path}: truncated or not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FolkError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise FolkError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    return header


def _inspect_folder(folder: Path, confine: bool = True) -> ModelInfo:
    files = collect_files(folder, confine=confine)
    weights = [p for p in files if p.endswith(".safetensors")]
    pickles = [p for p in files if p.endswith(_PICKLE_SUFFIXES)]
    if "config.json" in files:
        kind, config = "hf", _read_json(files["config.json"])
        architecture = config.get("model_type")
    elif "adapter_config.json" in files:
        kind, config = "adapter", _read_json(files["adapter_config.json"])
        architecture = f"{config.get('peft_type', 'adapter')}".lower() + " adapter"
    else:
        raise FolkError(
            f"{folder}: not a model (no config.json; expected a Hugging Face model folder "
            "or a .gguf file)"
        )
    if not weights and not pickles:
        raise FolkError(f"{folder}: not a model (config.json but no weights: *.safetensors)")
    params = 0
    dtypes: Counter[str] = Counter()
    for rel in weights:
        for name, info in safetensors_header(files[rel]).items():
            try:
                n = 1
                for d in info["shape"]:
                    n *= int(d)
                dtype = info["dtype"]
            except (KeyError, TypeError, ValueError):
                raise FolkError(f"{files[rel]}: tensor {name!r} has a malformed entry") from None
            if dtype not in _ST_DTYPES:
                raise FolkError(f"{files[rel]}: tensor {name!r} has unknown dtype {dtype!r}")
            params += n
            dtypes[dtype] += n
    return ModelInfo(
        format=kind,
        files=files,
        architecture=str(architecture) if architecture else None,
        parameters=params or None,
        quantization=_folder_quantization(config, dtypes),
        config=config,
    )


def _folder_quantization(config: dict[str, Any], dtypes: Counter) -> str | None:
    """A quantization recorded in config.json (transformers' ``quantization_config`` or
    folklm's own ``folklm_quantization``), else the dtype most weights are stored in."""
    for key in ("folklm_quantization", "quantization_config"):
        q = config.get(key)
        if isinstance(q, dict):
            if q.get("quant_method") == "folklm" and q.get("scheme"):
                return str(q["scheme"])  # already says its bits: int8, int4-g64, nf4 ...
            method = q.get("scheme") or q.get("quant_method") or "quantized"
            bits = q.get("bits") or q.get("w_bit")
            if q.get("load_in_4bit"):
                bits = 4
            return f"{method}-{bits}bit" if bits else str(method)
    return dtypes.most_common(1)[0][0] if dtypes else None


def _inspect_gguf(path: Path) -> ModelInfo:
    # lazy: only GGUF files need the gguf reader (numpy); the hub commands start without it
    import gguf

    from folklm.checkpoint.gguf_reader import GGUFFileError, open_gguf, read_metadata

    try:
        reader = open_gguf(path)
    except GGUFFileError as e:
        raise FolkError(f"{path}: {e}") from None
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise FolkError(f"{path}: not a model (GGUF without general.architecture)")
    if arch == "llama" and meta.get("llama.expert_count"):
        arch = "mixtral"
    tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]
    if not tensors:
        raise FolkError(f"{path}: not a model (a vocabulary-only GGUF file has no tensors)")
    quant: str | None
    try:  # a missing file type (-1) is not a LlamaFileType either
        quant = gguf.LlamaFileType(meta.get("general.file_type", -1)).name.removeprefix("MOSTLY_")
    except ValueError:
        counts = Counter(t.tensor_type.name for t in tensors if len(t.shape) > 1)
        quant = counts.most_common(1)[0][0] if counts else None
    prefix = f"{meta['general.architecture']}."
    config = {k: v for k, v in meta.items() if k.startswith(prefix) or k.startswith("general.")}
    kept = {k: v for k, v in meta.items() if not isinstance(v, list) or len(v) < 64}
    return ModelInfo(
        format="gguf",
        files={path.name: path},
        architecture=arch,
        parameters=sum(int(t.n_elements) for t in tensors),
        quantization=quant,
        config=config,
        gguf_metadata=kept,
    )

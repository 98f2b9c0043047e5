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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from folklm.checkpoint.hf import save_folder
from folklm.engine.llm import load
from folklm.errors import FolkError
from folklm.hub.derive import derive
from folklm.hub.names import parse_ref
from folklm.hub.resolve import resolve, resolve_path
from folklm.quant.api import parse_scheme, quantize, quantized_state_dict
from folklm.quant.gptq import GPTQConfig


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
    scheme: str,
    out: str,
    *,
    calibration: str | os.PathLike | None = None,
    dtype: str = "bfloat16",
    keep_head: bool = True,
    gptq: GPTQConfig | None = None,
    seed: int = 0,
    license: str | None = None,
    progress: bool = True,
):
    """Quantize ``model`` with ``scheme`` and register the result as ``out``.

    Args:
        model: registry name, Hugging Face folder or ``.gguf`` file (None: the default).
        scheme: one of :data:`folklm.kernels.schemes.SCHEMES`.
        out: ``NAME[:TAG]`` of the new entry.
        calibration: a UTF-8 text file (GPTQ only).
        dtype: dtype of the scales and of the float parts (embeddings, norms).
        keep_head: keep the LM head unquantized.
        gptq: GPTQ settings (damping, act-order, samples); the group size is the scheme's.
        seed: seeds the choice of calibration windows.

    Returns:
        The new hub :class:`~folklm.hub.catalogue.Entry`.
    """
    s = parse_scheme(scheme)
    parse_ref(out)  # a bad output name fails before any work (derive checks it again)
    if s.method == "gptq" and calibration is None:
        raise FolkError(f"scheme {s.name} needs --calibration FILE (UTF-8 text)")
    if s.method != "gptq" and calibration is not None:
        raise FolkError(f"scheme {s.name} takes no calibration file (gptq-int4 does)")
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
        seed=seed,
        license=license,
        description=f"{parent or path.name} quantized with folklm ({s.name})",
        source_info=None if parent else {"path": str(path)},
    )
    with derivation as d:
        torch.manual_seed(seed)
        llm = load(path, dtype=dtype, fast=False, resolve_base=resolve_path)
        cfg = gptq or (GPTQConfig(act_order=True) if s.method == "gptq" else None)
        quantize(
            llm,
            s.name,
            calibration=text,
            keep_embeddings_and_head=keep_head,
            progress=progress,
            gptq=cfg,
        )
        llm.config.torch_dtype = str(llm.dtype).removeprefix("torch.")
        recipe: dict[str, Any] = {
            "scheme": s.name,
            "dtype": llm.config.torch_dtype,
            "keep_head": keep_head,
            "source": str(path) if parent is None else parent,
        }
        if cfg is not None:
            recipe["gptq"] = {k: v for k, v in asdict(cfg).items() if k != "group_size"}
            recipe["gptq"]["group_size"] = s.group_size
        d.derivation.recipe = recipe
        state = quantized_state_dict(llm)
        save_folder(d.folder, llm.config, state, llm.tokenizer.files(), llm.generation_config)
        del llm, state
    return d.entry

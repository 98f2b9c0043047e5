"""``folk quantize``: a registry entry (or folder) in, a new quantized registry entry out.

The library function behind the command: load the float model, check everything that can
be checked before any work (scheme, output name, calibration file, not already
quantized), quantize, save a Hugging Face folder whose ``config.json`` records the scheme
(``quantization_config``) and whose ``model.safetensors`` holds the integer codes and
scales, then register it through :func:`folklm.hub.register.register_model` with its
parent, the full recipe and the hash of the calibration data.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from folklm.errors import FolkError
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
    """(files, parent registry name or None) for a registry name, a path or the default."""
    from folklm.engine.llm import is_registry_name
    from folklm.hub.api import resolve_model

    if model is None:
        from folklm.defaults import DEFAULT_NAME

        model = DEFAULT_NAME
    path = Path(model).expanduser()
    if not path.exists() and is_registry_name(model):
        return resolve_model(model), model
    if not path.exists():
        raise FolkError(f"{path}: no such file or folder")
    return path, None


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
        scheme: one of :data:`folklm.quant.api.SCHEMES`.
        out: ``NAME[:TAG]`` of the new entry.
        calibration: a UTF-8 text file (GPTQ only).
        dtype: dtype of the scales and of the float parts (embeddings, norms).
        keep_head: keep the LM head unquantized.
        gptq: GPTQ settings (damping, act-order, samples); the group size is the scheme's.
        seed: seeds the choice of calibration windows.

    Returns:
        The new hub :class:`~folklm.hub.catalogue.Entry`.
    """
    import torch

    import folklm
    from folklm.checkpoint.hf import save_folder
    from folklm.hub.names import parse_ref
    from folklm.hub.register import register_model

    started = time.time()
    s = parse_scheme(scheme)
    parse_ref(out)  # a bad output name fails before any work
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
    torch.manual_seed(seed)
    llm = folklm.load(path, dtype=dtype, fast=False)
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
    with tempfile.TemporaryDirectory(prefix="folk-quantize-") as tmp:
        folder = save_folder(
            Path(tmp) / "model",
            llm.config,
            quantized_state_dict(llm),
            llm.tokenizer.files(),
            llm.generation_config,
        )
        del llm
        return register_model(
            folder,
            out,
            "quantize",
            parents=[parent] if parent else [],
            recipe=recipe,
            data_files=[calibration] if calibration is not None else [],
            seed=seed,
            license=license,
            started_at=started,
            description=f"{parent or path.name} quantized with folklm ({s.name})",
            source_info=None if parent else {"path": str(path)},
            link=True,
        )

"""``folk export``: an entry out of the hub as a Hugging Face folder or a GGUF file.

Export is an operation (layer 4), not part of the store: it may load a model (a quantized
entry is dequantized or re-encoded), so it sits beside quantize, tune and merge and reads
the hub through :mod:`folklm.hub.api` like them.

* ``hf``: a Hugging Face entry's files are copied as they are (byte-identical, so
  ``transformers`` loads them exactly as it loaded the original), plus a model card when
  the entry has no README; a GGUF entry is dequantized into a float32 folder.
* ``gguf``: a Hugging Face entry is written by :mod:`folklm.checkpoint.gguf_writer` (F32,
  F16 or BF16); a GGUF entry is re-written with its tensors copied byte for byte. Either
  way the file carries ``general.license``, the parents as ``general.base_model.*``, the
  data files as ``general.dataset.*``, and the full lineage as ``folklm.lineage`` (JSON).

Outputs appear atomically: written beside the destination, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch

from folklm.checkpoint.gguf import read_gguf
from folklm.checkpoint.gguf_encode import Encoded
from folklm.checkpoint.gguf_writer import rewrite_gguf, write_gguf
from folklm.checkpoint.hf import read_config, read_generation_config, read_weights, save_folder
from folklm.config import ModelConfig
from folklm.engine.llm import load, parse_dtype
from folklm.errors import FolkError
from folklm.export.ollama import export_ollama
from folklm.export.quantized import default_gguf_type, gguf_tensors
from folklm.hub import api
from folklm.hub.card import model_card
from folklm.hub.catalogue import Entry, LineageNode
from folklm.hub.names import parse_ref
from folklm.tokenizer import Tokenizer

FORMATS = ("hf", "gguf", "ollama")


def gguf_metadata(entry: Entry, tree: LineageNode) -> dict[str, Any]:
    """The ``general.*`` licence/provenance keys and folklm's lineage for a GGUF export."""
    ref = parse_ref(entry.name)
    meta: dict[str, Any] = {
        "general.name": ref.name if ref.tag == "latest" else f"{ref.name}:{ref.tag}",
        "general.license": entry.license.get("expression"),
        "general.base_model.count": len(entry.parents) if entry.parents else None,
        "folklm.content_hash": f"sha256:{entry.digest}",
        "folklm.operation": entry.operation,
        "folklm.recipe": json.dumps(entry.recipe, sort_keys=True),
        "folklm.lineage": json.dumps(tree.to_dict(), sort_keys=True),
    }
    if entry.description:
        meta["general.description"] = entry.description
    for i, p in enumerate(entry.parents):
        meta[f"general.base_model.{i}.name"] = p["name"]
    names = sorted({d["name"] for d in entry.data_files})
    if names:
        meta["general.dataset.count"] = len(names)
        for i, n in enumerate(names):
            meta[f"general.dataset.{i}.name"] = n
    return meta


def export(
    name: str,
    out: str | os.PathLike | None,
    format: str = "hf",
    *,
    dtype: str = "auto",
    force: bool = False,
    store: str | os.PathLike | None = None,
) -> Path:
    """Write entry ``name`` to ``out`` as a Hugging Face folder or a GGUF file.

    Args:
        out: for ``hf`` the folder to create (it must not exist, or be empty); for
            ``gguf`` a ``.gguf`` file path or a folder to put ``<name>.gguf`` in.
        format: ``hf`` or ``gguf``.
        dtype: GGUF tensor type for Hugging Face entries: ``auto`` (as stored; Q8_0 for an
            int8 entry and Q4_1 for an int4/GPTQ one, both without re-rounding, Q4_0 for
            NF4), ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``; for ``hf`` from
            a GGUF entry ``auto`` means float32.
        force: overwrite an existing GGUF file or non-empty folder.
        store: for ``ollama``, an Ollama store folder to write into instead of ``out``.

    Returns:
        The folder, file, or (``ollama --store``) manifest written.
    """
    return Path(export_report(name, out, format, dtype=dtype, force=force, store=store)["path"])


def export_report(
    name: str,
    out: str | os.PathLike | None,
    format: str = "hf",
    *,
    dtype: str = "auto",
    force: bool = False,
    store: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """:func:`export`, returning what was written: ``path`` and, for ``ollama``, the
    Modelfile/manifest, the Ollama name and notes on what carried over."""
    if format not in FORMATS:
        raise FolkError(f"unknown export format {format!r}; expected hf, gguf or ollama")
    if store is not None and format != "ollama":
        raise FolkError("--store is for --format ollama (an Ollama store folder)")
    if format == "ollama" and (out is None) == (store is None):
        raise FolkError(
            "--format ollama takes one of DIR (a Modelfile folder) or --store DIR (an Ollama store)"
        )
    if out is None and format != "ollama":
        raise FolkError(f"--format {format} needs an output DIR")
    entry = api.show(name)
    tree = api.lineage(name)
    src = api.resolve_model(name)
    if format == "ollama":
        if dtype not in ("auto", "f32", "f16", "bf16", "q8_0", "q4_0"):
            raise FolkError(f"--dtype {dtype} is not a GGUF type")

        def gguf_writer(path: Path) -> Path:
            return _export_gguf(entry, tree, src, path, dtype, True)

        report = export_ollama(
            entry,
            src,
            Path(out).expanduser() if out is not None else None,
            Path(store).expanduser() if store is not None else None,
            force,
            gguf_writer,
        )
        report["path"] = report.get("manifest") or report["path"]
        return report
    assert out is not None
    out = Path(out).expanduser()
    if format == "hf":
        if entry.format != "gguf" and dtype != "auto":
            raise FolkError(
                f"{entry.name} is already a Hugging Face folder and is exported unchanged; "
                "--dtype applies to GGUF entries and to --format gguf"
            )
        return {"model": name, "path": str(_export_hf(entry, src, out, dtype, force))}
    return {"model": name, "path": str(_export_gguf(entry, tree, src, out, dtype, force))}


def _export_hf(entry: Entry, src: Path, out: Path, dtype: str, force: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FolkError(f"{out} exists and is not empty; choose a new folder or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if entry.format == "gguf":
            _gguf_to_folder(src, staging, dtype)
        else:
            for f in entry.files:
                target = staging / f["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / f["path"], target)  # follows the symlink to the blob
        if not (staging / "README.md").exists():
            (staging / "README.md").write_text(model_card(entry.name), encoding="utf-8")
        for p in staging.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _gguf_to_folder(src: Path, folder: Path, dtype: str) -> None:
    torch_dtype = parse_dtype("float32" if dtype == "auto" else dtype)
    ckpt = read_gguf(src, dtype=torch_dtype)
    config = ModelConfig.from_dict(ckpt.config)
    tokenizer = Tokenizer(ckpt.tokenizer, ckpt.tokenizer_config, source=str(src))
    inner = folder / "model"
    save_folder(inner, config, ckpt.tensors, tokenizer.files(), ckpt.generation_config)
    for p in inner.iterdir():
        os.replace(p, folder / p.name)
    inner.rmdir()


def _export_gguf(
    entry: Entry, tree: LineageNode, src: Path, out: Path, dtype: str, force: bool
) -> Path:
    if out.suffix.lower() != ".gguf":
        ref = parse_ref(entry.name)
        stem = ref.name if ref.tag == "latest" else f"{ref.name}-{ref.tag}"
        out.mkdir(parents=True, exist_ok=True)
        out = out / f"{stem}.gguf"
    if out.exists() and not force:
        raise FolkError(f"{out} exists; pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = gguf_metadata(entry, tree)
    if entry.format == "gguf" and dtype == "auto":
        return rewrite_gguf(src, out, meta)
    if entry.format == "gguf":  # re-encode: dequantize, then write the requested float type
        ckpt = read_gguf(src)
        tokenizer = Tokenizer(ckpt.tokenizer, ckpt.tokenizer_config, source=str(src))
        return write_gguf(
            out,
            ckpt.config,
            ckpt.tensors,
            tokenizer,
            ckpt.generation_config,
            dtype=dtype,
            metadata=meta,
        )
    if entry.format != "hf":
        raise FolkError(f"{entry.name} is a PEFT adapter; only full models export to GGUF")
    config = read_config(src)
    scheme = config.extra.get("quantization_config")
    tensors: Mapping[str, torch.Tensor | Encoded]
    if isinstance(scheme, dict):  # a folklm-quantized entry: Q8_0 / Q4_1 / Q4_0 blocks
        if dtype == "auto":
            dtype = default_gguf_type(str(scheme.get("scheme")))
        model = load(src, dtype="float32", fast=False).model
        tensors = gguf_tensors(model, dtype)
        config.extra.pop("quantization_config")
        config.torch_dtype = "float32"
    else:
        tensors = read_weights(src)
    tokenizer = Tokenizer.from_folder(src)
    return write_gguf(
        out,
        config.to_dict(),
        # write_gguf takes Encoded blocks too (its docstring); its annotation says Tensor only
        cast("Mapping[str, torch.Tensor]", tensors),
        tokenizer,
        read_generation_config(src),
        dtype=dtype,
        metadata=meta,
    )

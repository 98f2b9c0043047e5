"""``folk export NAME --format ollama``: a Modelfile + GGUF, or an entry in an Ollama store.

* a folder (``DIR``): ``DIR/MODEL.gguf`` and ``DIR/Modelfile`` (``FROM ./MODEL.gguf``,
  ``TEMPLATE``, ``SYSTEM``, ``PARAMETER``, ``LICENSE``), for ``ollama create NAME -f
  DIR/Modelfile`` (https://github.com/ollama/ollama/blob/main/docs/modelfile.md);
* a store (``--store DIR``, e.g. ``~/.ollama/models``): the blobs and the manifest
  ``manifests/registry.ollama.ai/library/NAME/TAG`` written as ``ollama pull`` writes
  them (:mod:`folklm.hub.ollama`), so ``ollama list`` shows the model.

What carries over: the GGUF (byte for byte for a GGUF entry; a Hugging Face entry is
written to GGUF first, as ``folk export --format gguf``), and for an entry that came from
Ollama its template, system, params and licence layers verbatim. For other entries the
template is translated from the model's Jinja chat template where its family is known
(ChatML, Llama 3, Gemma, Mistral, Phi-3: the Go templates Ollama's own library uses for
them, :mod:`folklm.export.gotemplate`), with the system message the Jinja template adds
to a conversation without one as ``SYSTEM``; an unknown template is left out, and Ollama
then falls back to the GGUF's own ``tokenizer.chat_template``. Stop strings come from the
family and the end-of-sequence token; the licence is the entry's LICENSE file, else its
licence expression.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from folklm.errors import FolkError
from folklm.export.gotemplate import default_system, go_template
from folklm.hub import ollama
from folklm.hub.catalogue import Entry
from folklm.hub.names import parse_ref
from folklm.hub.sources import clone_file, json_text


@dataclass
class OllamaModel:
    """What an Ollama model is made of, before it is written either way."""

    gguf: Path
    template: str | None = None
    system: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    params_text: str | None = None  # verbatim from Ollama, else written from params
    licenses: list[str] = field(default_factory=list)
    messages: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _gguf_metadata(path: Path) -> dict[str, Any]:
    # lazy: numpy-backed reader, only for GGUF entries
    from folklm.checkpoint.gguf_reader import open_gguf, read_metadata

    return read_metadata(open_gguf(path))


def _describe(entry: Entry, gguf: Path, meta: dict[str, Any], folder: Path | None) -> OllamaModel:
    model = OllamaModel(gguf)
    carried = ollama.carried_layers(entry.source)
    if carried:
        model.template = next(iter(carried.get(ollama.TEMPLATE, [])), None)
        model.system = next(iter(carried.get(ollama.SYSTEM, [])), None)
        model.messages = next(iter(carried.get(ollama.MESSAGES, [])), None)
        model.licenses = carried.get(ollama.LICENSE, [])
        if params := carried.get(ollama.PARAMS):
            model.params_text = params[0]
            model.params = json.loads(params[0])
        model.config = dict((entry.source or {}).get("config") or {})
        model.notes.append("template, system, params and licence carried from Ollama")
        return model
    jinja = meta.get("tokenizer.chat_template")
    if folder is not None and (folder / "tokenizer_config.json").is_file():
        tok = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        jinja = tok.get("chat_template") if isinstance(tok.get("chat_template"), str) else jinja
    template, stops, family = go_template(jinja if isinstance(jinja, str) else None)
    model.template = template
    if family:
        model.notes.append(f"template: the {family} chat template, as a Go template")
    if template is not None and isinstance(jinja, str):
        model.system = default_system(jinja, template)
        if model.system is not None:
            model.notes.append("system: the chat template's default system message")
    elif jinja:
        model.notes.append("template: not a known family; Ollama will use the GGUF's own")
    tokens = meta.get("tokenizer.ggml.tokens")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if isinstance(tokens, list) and isinstance(eos, int) and 0 <= eos < len(tokens):
        if str(tokens[eos]) not in stops:
            stops.append(str(tokens[eos]))
    if stops:
        model.params["stop"] = stops
    lic_file = next(
        (
            folder / n
            for n in ("LICENSE", "LICENSE.txt", "LICENSE.md")
            if folder and (folder / n).is_file()
        ),
        None,
    )
    if lic_file is not None:
        model.licenses = [lic_file.read_text(encoding="utf-8", errors="replace")]
    elif entry.license.get("expression"):
        model.licenses = [str(entry.license["expression"])]
    return model


def _quote(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    return json.dumps(str(value), ensure_ascii=False)


def _block(keyword: str, text: str) -> str:
    if '"""' in text:
        raise FolkError(f'the {keyword} contains """, which a Modelfile cannot quote')
    return f'{keyword} """{text}"""\n'


def modelfile(model: OllamaModel, gguf_name: str, title: str) -> str:
    """The Modelfile text for ``model`` with its GGUF at ``./gguf_name``."""
    lines = [f"# {title}\n", f"FROM ./{gguf_name}\n"]
    if model.template is not None:
        lines.append(_block("TEMPLATE", model.template))
    if model.system is not None:
        lines.append(_block("SYSTEM", model.system))
    for key, value in model.params.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {_quote(v)}\n")
    if model.messages:
        for m in json.loads(model.messages):
            lines.append(f"MESSAGE {m.get('role')} {_quote(m.get('content', ''))}\n")
    for text in model.licenses:
        lines.append(_block("LICENSE", text))
    return "".join(lines)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # readable by an Ollama server running as its own user
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _put_blob(blobs: Path, data: bytes, media_type: str) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    target = blobs / f"sha256-{digest}"
    if not (target.is_file() and target.stat().st_size == len(data)):
        _atomic_write(target, data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def _put_file_blob(blobs: Path, src: Path, media_type: str, sha: str) -> dict[str, Any]:
    target = blobs / f"sha256-{sha}"
    size = src.stat().st_size
    if not (target.is_file() and target.stat().st_size == size):
        blobs.mkdir(parents=True, exist_ok=True)
        tmp = blobs / f".{sha}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            clone_file(src, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return {"mediaType": media_type, "digest": f"sha256:{sha}", "size": size}


def write_store(model: OllamaModel, store: Path, name: str, tag: str, gguf_sha: str) -> Path:
    """Write ``model`` into the Ollama store ``store``; returns the manifest path."""
    blobs = store / "blobs"
    layers = [_put_file_blob(blobs, model.gguf, ollama.MODEL, gguf_sha)]
    if model.template is not None:
        layers.append(_put_blob(blobs, model.template.encode(), ollama.TEMPLATE))
    if model.system is not None:
        layers.append(_put_blob(blobs, model.system.encode(), ollama.SYSTEM))
    for text in model.licenses:
        layers.append(_put_blob(blobs, text.encode(), ollama.LICENSE))
    if model.messages is not None:
        layers.append(_put_blob(blobs, model.messages.encode(), ollama.MESSAGES))
    if model.params:
        text = model.params_text if model.params_text is not None else json_text(model.params)
        layers.append(_put_blob(blobs, text.encode(), ollama.PARAMS))
    config = dict(model.config)
    config.setdefault("model_format", "gguf")
    config["rootfs"] = {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]}
    config_layer = _put_blob(blobs, json_text(config).encode(), ollama.CONFIG_TYPE)
    manifest = {
        "schemaVersion": 2,
        "mediaType": ollama.MANIFEST_TYPE,
        "config": config_layer,
        "layers": layers,
    }
    path = store / "manifests" / ollama.DEFAULT_REGISTRY / "library" / name / tag
    _atomic_write(path, json_text(manifest).encode())
    return path


def export_ollama(
    entry: Entry, src: Path, out: Path | None, store: Path | None, force: bool, gguf_writer
) -> dict[str, Any]:
    """Write ``entry`` (files at ``src``) as a Modelfile folder ``out`` or into ``store``.

    ``gguf_writer(path)`` writes a Hugging Face entry as GGUF (``folk export --format
    gguf``); a GGUF entry's file is used as it is.
    """
    if entry.format == "adapter":
        raise FolkError(f"{entry.name} is a PEFT adapter; only full models export to Ollama")
    ref = parse_ref(entry.name)
    with tempfile.TemporaryDirectory(prefix="folk-ollama-") as tmp:
        folder = None
        if entry.format == "gguf":
            gguf = src
            sha = entry.files[0]["sha256"]
        else:
            folder = src
            gguf = gguf_writer(Path(tmp) / f"{ref.name}.gguf")
            sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
        meta = _gguf_metadata(gguf)
        model = _describe(entry, gguf, meta, folder)
        if not model.config:
            model.config = {
                "model_format": "gguf",
                "model_family": entry.architecture,
                "model_families": [entry.architecture] if entry.architecture else None,
                "file_type": entry.quantization,
            }
            model.config = {k: v for k, v in model.config.items() if v is not None}
        if store is not None:
            manifest = write_store(model, store, ref.name, ref.tag, sha)
            return {
                "model": entry.name,
                "store": str(store),
                "manifest": str(manifest),
                "ollama_name": f"{ref.name}:{ref.tag}",
                "notes": model.notes,
            }
        assert out is not None
        return _write_folder(
            entry, model, out, force, ref.name if ref.tag == "latest" else f"{ref.name}-{ref.tag}"
        )


def _write_folder(entry: Entry, model: OllamaModel, out: Path, force: bool, stem: str):
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FolkError(f"{out} exists and is not empty; choose a new folder or pass --force")
    text = modelfile(
        model, f"{stem}.gguf", f"written by folklm from {entry.name} (sha256:{entry.digest})"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        target = staging / f"{stem}.gguf"
        clone_file(model.gguf, target, hardlink=False)  # the user's copy: never the blob
        (staging / "Modelfile").write_text(text, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "model": entry.name,
        "path": str(out),
        "modelfile": str(out / "Modelfile"),
        "gguf": str(out / f"{stem}.gguf"),
        "notes": model.notes,
    }

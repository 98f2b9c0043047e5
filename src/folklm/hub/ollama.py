"""The Ollama model format: names, registry manifests, layers (no network, no model).

An Ollama model is an OCI/Docker registry manifest (schema 2) whose ``config`` is a small
JSON blob and whose ``layers`` are blobs addressed by sha256, one per media type:

==========================================  ===========================================
``application/vnd.ollama.image.model``      the weights: a GGUF file
``application/vnd.ollama.image.template``   the prompt template (Go ``text/template``)
``application/vnd.ollama.image.system``     the default system message
``application/vnd.ollama.image.params``     default options, JSON (``stop``, ...)
``application/vnd.ollama.image.license``    a licence text (one layer per licence)
``application/vnd.ollama.image.messages``   example messages, JSON
==========================================  ===========================================

(https://github.com/ollama/ollama/blob/main/server/images.go and ``docs/api.md``). The same
manifest sits in a registry (``/v2/NAMESPACE/MODEL/manifests/TAG``) and in a local store
(``manifests/HOST/NAMESPACE/MODEL/TAG``); blobs are ``/v2/.../blobs/sha256:HEX`` and
``blobs/sha256-HEX``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from folklm.errors import FolkError
from folklm.hub.licenses import identify_text, split_expression
from folklm.hub.names import ModelRef

DEFAULT_REGISTRY = "registry.ollama.ai"
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
PREFIX = "application/vnd.ollama.image."
MODEL = PREFIX + "model"
TEMPLATE = PREFIX + "template"
SYSTEM = PREFIX + "system"
PARAMS = PREFIX + "params"
LICENSE = PREFIX + "license"
MESSAGES = PREFIX + "messages"
TEXT_TYPES = (TEMPLATE, SYSTEM, PARAMS, LICENSE, MESSAGES)
UNSUPPORTED = {PREFIX + "adapter": "a LoRA adapter", PREFIX + "projector": "a vision projector"}
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_TEXT_LIMIT = 16 << 20  # a template, licence or params blob is text, never this large


@dataclass(frozen=True)
class OllamaName:
    """``[HOST/][NAMESPACE/]MODEL[:TAG]``; ``library`` and ``latest`` by default."""

    host: str
    namespace: str
    model: str
    tag: str

    def __str__(self) -> str:
        base = self.model if self.namespace == "library" else f"{self.namespace}/{self.model}"
        return f"{base}:{self.tag}"

    @property
    def manifest_path(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}/{self.tag}"

    @property
    def hub_name(self) -> str:
        """The hub name it is imported under by default (``llama3.2:1b``,
        ``team-model:7b-q4_k_m``)."""
        model = self.model if self.namespace == "library" else f"{self.namespace}-{self.model}"
        return str(ModelRef(_hub_part(model), _hub_part(self.tag)))

    @property
    def file_name(self) -> str:
        return f"{_hub_part(self.model)}.gguf"


def _hub_part(text: str) -> str:
    """``text`` as a hub name part (Ollama names are already close: letters, digits, . _ -)."""
    part = re.sub(r"[^a-z0-9._-]+", "-", text.lower())
    return re.sub(r"\.{2,}", ".", part).strip("._-")[:64] or "model"


def parse_name(text: str, host: str = DEFAULT_REGISTRY) -> OllamaName:
    """Parse ``NAME[:TAG]`` as ``ollama pull`` does (``user/model``, ``host/ns/model``).

    Raises:
        FolkError: an empty part, a space, ``..`` or a character outside ``[A-Za-z0-9._-]``.
    """
    spec = text.removeprefix("ollama:")
    base, sep, tag = spec.rpartition(":") if ":" in spec.rsplit("/", 1)[-1] else (spec, "", "")
    parts = base.split("/")
    if not sep:
        tag = "latest"
    if len(parts) == 3:
        host, namespace, model = parts
    elif len(parts) == 2:
        host, namespace, model = host, parts[0], parts[1]
    elif len(parts) == 1:
        namespace, model = "library", parts[0]
    else:
        raise FolkError(f"invalid Ollama model name {text!r}: expected [NAMESPACE/]MODEL[:TAG]")
    for kind, part in (("namespace", namespace), ("model", model), ("tag", tag)):
        if not _PART.fullmatch(part) or ".." in part:
            raise FolkError(
                f"invalid Ollama model name {text!r}: the {kind} {part!r} must be letters, "
                "digits, '.', '_' or '-'"
            )
    return OllamaName(host, namespace, model, tag)  # case kept: store paths and URLs use it


@dataclass(frozen=True)
class Layer:
    """One blob of a manifest."""

    media_type: str
    digest: str
    size: int

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    def to_dict(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass
class Manifest:
    """A parsed manifest: its config blob and layers, the model layer found."""

    config: Layer
    layers: list[Layer]
    model_layer: Layer
    text_layers: list[Layer] = field(default_factory=list)


def _layer(item: Any, where: str) -> Layer:
    if not isinstance(item, dict):
        raise FolkError(f"{where}: a layer is not a JSON object")
    digest, size, kind = item.get("digest"), item.get("size"), item.get("mediaType")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise FolkError(f"{where}: layer digest {digest!r} is not sha256:<64 hex digits>")
    if not isinstance(size, int) or size < 0:
        raise FolkError(f"{where}: layer {digest} has size {size!r}, expected an integer >= 0")
    if not isinstance(kind, str):
        raise FolkError(f"{where}: layer {digest} has no mediaType")
    return Layer(kind, digest, size)


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Validate a manifest; exactly one model layer, no adapter or projector.

    Raises:
        FolkError: not JSON, a malformed layer, or a model folklm cannot take.
    """
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FolkError(f"{where}: the manifest is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
        raise FolkError(f"{where}: the manifest has no 'layers' list")
    config = _layer(data.get("config"), where)
    layers = [_layer(item, where) for item in data["layers"]]
    for layer in layers:
        if layer.media_type in UNSUPPORTED:
            raise FolkError(
                f"{where}: the model has {UNSUPPORTED[layer.media_type]} layer "
                f"({layer.media_type}), which folklm does not import"
            )
    models = [layer for layer in layers if layer.media_type == MODEL]
    if len(models) != 1:
        raise FolkError(f"{where}: expected one {MODEL} layer, found {len(models)}")
    text = [layer for layer in layers if layer.media_type in TEXT_TYPES]
    for layer in text:
        if layer.size > _TEXT_LIMIT:
            raise FolkError(f"{where}: {layer.media_type} layer of {layer.size} bytes is too big")
    return Manifest(config, layers, models[0], text)


def check_bytes(data: bytes, layer: Layer, what: str) -> None:
    """Raise unless ``data`` is the blob ``layer`` names (size and sha256)."""
    got = hashlib.sha256(data).hexdigest()
    if len(data) != layer.size or got != layer.hex:
        raise FolkError(
            f"{what}: blob {layer.digest[:19]}… ({layer.media_type}) hashes to sha256:"
            f"{got[:12]}… ({len(data)} bytes); refused (corrupted or tampered)"
        )


def read_text_layer(path: Path, layer: Layer, what: str) -> str:
    """A text layer's content, checked against its digest."""
    data = path.read_bytes()
    check_bytes(data, layer, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FolkError(f"{what}: {layer.media_type} layer {layer.digest} is not UTF-8") from None


def read_config(path: Path, layer: Layer, what: str) -> dict[str, Any]:
    """The config blob (model_format, model_family, file_type...), checked."""
    data = path.read_bytes()
    check_bytes(data, layer, what)
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FolkError(f"{what}: the config blob {layer.digest} is not JSON") from None
    if not isinstance(value, dict):
        raise FolkError(f"{what}: the config blob {layer.digest} is not a JSON object")
    return value


def layer_license(manifest: Manifest, texts: dict[str, str]) -> tuple[str | None, str | None]:
    """The licence expression its licence layers' texts identify, and where it was found."""
    ids: list[str] = []
    where: list[str] = []
    for layer in manifest.text_layers:
        if layer.media_type != LICENSE:
            continue
        text = texts[layer.digest]
        lic = identify_text(text)
        if lic is None and len(text) < 80 and split_expression(text.strip()):
            ids += split_expression(text.strip())  # a layer that is just an id: "apache-2.0"
            where.append(f"Ollama licence layer {layer.digest[:19]}… (the id {text.strip()!r})")
        elif lic is not None and lic.id not in ids:
            ids.append(lic.id)
            where.append(
                f"Ollama licence layer {layer.digest[:19]}… (text identified as the {lic.name})"
            )
    if not ids:
        return None, None
    return " AND ".join(ids), "; ".join(where)


def source_record(
    manifest: Manifest,
    texts: dict[str, str],
    config: dict[str, Any],
    *,
    origin: str,
    where: str,
    ref: OllamaName,
    manifest_digest: str,
) -> dict[str, Any]:
    """What an entry records about its Ollama origin: enough to write the model back
    byte for byte (text layers are kept verbatim)."""
    return {
        "origin": origin,
        "url": where,
        "ollama_name": str(ref),
        "registry": ref.host,
        "manifest_digest": manifest_digest,
        "config": config,
        "layers": [
            {**layer.to_dict(), **({"text": texts[layer.digest]} if layer.digest in texts else {})}
            for layer in manifest.layers
        ],
    }


def carried_layers(source: dict[str, Any] | None) -> dict[str, list[str]]:
    """Text layers an entry brought from Ollama, by media type (empty for other origins)."""
    out: dict[str, list[str]] = {}
    if not source or not str(source.get("origin", "")).startswith("ollama"):
        return out
    for layer in source.get("layers", []):
        if isinstance(layer, dict) and isinstance(layer.get("text"), str):
            out.setdefault(str(layer.get("mediaType")), []).append(layer["text"])
    return out

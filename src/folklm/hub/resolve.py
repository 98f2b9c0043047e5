"""The one resolver: a hub name, a path or nothing -> the files to load.

Every front door and operation asks this module, and only this module, whether a text is a
hub reference (``name`` or ``name:tag``) or a path; the engine then loads a path and never
sees a name. A text that exists on disk is always a path; otherwise a bare name without a
path separator or model-file suffix is looked up in the hub. ``None`` is the bundled default
model (:mod:`folklm.hub.defaults`), converted and registered on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from folklm.errors import FolkError
from folklm.hub import catalogue
from folklm.hub.defaults import DEFAULT_NAME, default_model_folder
from folklm.hub.names import ModelRef, parse_ref
from folklm.hub.store import Store


@dataclass(frozen=True)
class Source:
    """What a model reference resolved to.

    Attributes:
        path: a Hugging Face folder, a PEFT adapter folder or a ``.gguf`` file (it may not
            exist when the reference was a path; the loader says so).
        name: the hub reference as given (``"tiny"``, ``"tiny:v2"``) when the files are a
            hub entry or the bundled default, else None: the parent to record in lineage.
    """

    path: Path
    name: str | None = None


def is_hub_name(text: str) -> bool:
    """A bare ``name`` or ``name:tag`` (no path separator, no model-file suffix)."""
    return bool(text) and "/" not in text and "\\" not in text and not text.endswith(".gguf")


def hub_name(source: str | os.PathLike | None) -> str | None:
    """The hub reference ``source`` stands for, without opening the hub; None for a path."""
    if source is None:
        return DEFAULT_NAME
    text = os.fspath(source)
    if Path(text).expanduser().exists() or not is_hub_name(text):
        return None
    return text


def resolve(source: str | os.PathLike | None) -> Source:
    """Resolve a model reference: None (bundled default), a hub name or a path.

    Raises:
        FolkError: a hub name that is invalid or not in the hub.
    """
    if source is None:
        return Source(default_model_folder(), DEFAULT_NAME)
    name = hub_name(source)
    if name is None:
        return Source(Path(os.fspath(source)).expanduser())
    return Source(resolve_model(name), name)


def resolve_path(source: str | os.PathLike | None) -> Path:
    """``resolve(source).path``: e.g. the ``resolve_base`` of :func:`folklm.engine.llm.load`."""
    return resolve(source).path


def resolve_model(name: str) -> Path:
    """The files of hub entry ``name[:tag]``: a Hugging Face folder or a ``.gguf`` file.

    The folder holds symlinks to the blobs, so weights are memory-mapped from the store.

    Raises:
        FolkError: invalid or unknown name (``unknown model 'x:latest'; see folk ls``).
    """
    ref = parse_ref(name)
    for attempt in range(2):
        store = Store()
        if store.exists():
            with store, store.read() as conn:
                row = catalogue.find_model(conn, ref)
                files = catalogue.files_of(conn, row["id"]) if row is not None else []
            if row is not None:
                folder = store.entry_folder(
                    row["digest"], [(f["path"], f["sha256"]) for f in files]
                )
                if row["format"] == "gguf":
                    return folder / files[0]["path"]
                return folder
        if attempt or ref != ModelRef(DEFAULT_NAME):
            break
        default_model_folder()  # converts (first use) and registers the bundled model
    raise FolkError(f"unknown model '{ref}'; see folk ls")

"""The hub's library API: what the CLI, ``folklm.load`` and every model-making operation call.

* writing: :func:`register_model` (every operation that makes a model -- import today;
  quantize, tune and merge later -- records it through this one function, see
  :mod:`folklm.hub.register`), :func:`import_path`, :func:`add_evaluation`;
* reading: :func:`resolve_model` (``folklm.load("name:tag")``), :func:`show`,
  :func:`list_models`, :func:`lineage`;
* upkeep: :func:`remove`, :func:`tag`, :func:`verify`, :func:`collect_garbage` (see
  :mod:`folklm.hub.maintenance`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from folklm.errors import FolkError
from folklm.hub import catalogue
from folklm.hub.catalogue import Entry, LineageNode
from folklm.hub.maintenance import (
    add_evaluation,
    collect_garbage,
    register_default_model,
    remove,
    remove_many,
    tag,
    verify,
)
from folklm.hub.names import ModelRef, parse_ref, suggest_ref
from folklm.hub.register import DataFile, HubWarning, register_model
from folklm.hub.store import Store

__all__ = [
    "DataFile",
    "HubWarning",
    "add_evaluation",
    "collect_garbage",
    "import_path",
    "lineage",
    "list_models",
    "register_default_model",
    "register_model",
    "remove",
    "remove_many",
    "resolve_model",
    "show",
    "tag",
    "verify",
]


def import_path(
    path: str | os.PathLike, name: str | None = None, license: str | None = None
) -> Entry:
    """Import a Hugging Face folder or a GGUF file (``folk import``).

    Without ``name`` the folder or file name is used (``Foo-7B.Q4_K_M.gguf`` ->
    ``foo-7b:q4_k_m``). The licence is read from the files unless ``license`` is given.
    """
    p = Path(path).expanduser()
    ref = parse_ref(name) if name is not None else None
    if not p.exists():
        raise FolkError(f"{p}: no such file or folder")
    p = p.resolve()
    if ref is None:
        ref = suggest_ref(p.stem if p.is_file() else p.name)
    # The files' hashes are in the entry itself; the source records where they came from.
    return register_model(p, str(ref), "import", license=license, source_info={"path": str(p)})


# -- reading ------------------------------------------------------------------------------
def _open_existing() -> Store | None:
    store = Store()
    return store if store.exists() else None


def resolve_model(name: str) -> Path:
    """The files of registry entry ``name[:tag]``: a Hugging Face folder or a ``.gguf`` file.

    The folder holds symlinks to the blobs, so weights are memory-mapped from the store.

    Raises:
        FolkError: invalid or unknown name (``unknown model 'x:latest'; see folk ls``).
    """
    ref = parse_ref(name)
    for attempt in range(2):
        store = _open_existing()
        if store is not None:
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
        from folklm.defaults import DEFAULT_NAME, default_model_folder

        if attempt or ref != ModelRef(DEFAULT_NAME):
            break
        default_model_folder()  # converts (first use) and registers the bundled model
    raise FolkError(f"unknown model '{ref}'; see folk ls")


def show(name: str) -> Entry:
    """The full record of ``name`` (``folk show``)."""
    ref = parse_ref(name)
    store = _open_existing()
    if store is None:
        raise FolkError(f"unknown model '{ref}'; see folk ls")
    with store, store.read() as conn:
        return catalogue.load_entry(conn, catalogue.require_model(conn, ref), str(ref))


def list_models() -> list[dict[str, Any]]:
    """One dict per tag (``folk ls``)."""
    store = _open_existing()
    if store is None:
        return []
    with store, store.read() as conn:
        return catalogue.list_rows(conn)


def lineage(name: str) -> LineageNode:
    """The ancestry tree of ``name``: each node with its operation, content hash, licence."""
    ref = parse_ref(name)
    store = _open_existing()
    if store is None:
        raise FolkError(f"unknown model '{ref}'; see folk ls")
    with store, store.read() as conn:
        row = catalogue.require_model(conn, ref)
        return catalogue.lineage_tree(conn, row["id"], str(ref))


# The rest of the API (rm, tag, verify, gc, evaluations, the bundled model) lives in
# maintenance.py; re-exported here so that callers import one module.

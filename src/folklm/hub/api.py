"""The hub's library API: what the CLI, ``folklm.load`` and every model-making operation call.

* writing: :func:`register_model` (every operation that makes a model -- import today;
  quantize, tune and merge later -- records it through this one function, see
  :mod:`folklm.hub.register`), :func:`import_path`, :func:`add_evaluation`;
* reading: :func:`resolve` (name, path or None -> files, see :mod:`folklm.hub.resolve`),
  :func:`show`,
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
from folklm.hub.defaults import register_default_model
from folklm.hub.maintenance import (
    add_evaluation,
    collect_garbage,
    remove,
    remove_many,
    tag,
    verify,
)
from folklm.hub.names import parse_ref, suggest_ref
from folklm.hub.register import DataFile, Derivation, HubWarning, register_model
from folklm.hub.resolve import Source, resolve, resolve_model
from folklm.hub.store import Store

__all__ = [
    "DataFile",
    "Derivation",
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
    "resolve",
    "resolve_model",
    "Source",
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
    return register_model(
        p, str(ref), Derivation("import", license=license, source_info={"path": str(p)})
    )


# -- reading ------------------------------------------------------------------------------
def _open_existing() -> Store | None:
    store = Store()
    return store if store.exists() else None


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
# maintenance.py and defaults.py; re-exported here so that callers import one module.

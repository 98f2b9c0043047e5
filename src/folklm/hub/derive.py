"""The derivation context: how every model-making operation writes its result to the hub.

::

    with derive("tiny-q8:v1", "quantize", parents=["tiny"], recipe={...}, seed=0) as d:
        save_folder(d.folder, ...)          # the operation writes its model here
        d.derivation.recipe["dtype"] = ...  # facts known only at the end may be added
    d.entry                                 # the registered hub entry

On entry the output name is validated (a bad name fails before any work) and the clock
starts; the operation writes into ``d.folder`` (a staging folder under ``$FOLK_HOME``, on
the store's file system so its files are hard-linked, not copied). On a normal exit the
model is registered through :func:`folklm.hub.register.register_model` with its parents,
recipe, data hashes, seed, duration and the folklm version. On an exception nothing is left
behind: no entry (``register_model`` writes in one transaction, last) and no staged files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from folklm.hub.catalogue import Entry
from folklm.hub.names import parse_ref
from folklm.hub.register import DataFile, Derivation, register_model
from folklm.hub.store import ensure_home


@dataclass
class Staged:
    """The handle ``derive`` yields.

    Attributes:
        name: the new entry's reference, normalised (``"tiny-q8:v1"``).
        folder: where the operation writes the model (it does not exist yet).
        derivation: what will be recorded; the operation may complete its ``recipe``.
        entry: the registered entry, set when the ``with`` block has ended without error.
    """

    name: str
    folder: Path
    derivation: Derivation
    entry: Entry | None = None


@contextmanager
def derive(
    name: str,
    operation: str,
    *,
    parents: Sequence[str] = (),
    recipe: Mapping[str, Any] | None = None,
    data_files: Sequence[str | os.PathLike | DataFile] = (),
    seed: int | None = None,
    license: str | None = None,
    force: bool = False,
    description: str | None = None,
    source_info: Mapping[str, Any] | None = None,
    folder: str | os.PathLike | None = None,
    started_at: float | None = None,
) -> Iterator[Staged]:
    """Stage, time and register one derived model (see the module docstring).

    Args:
        name: ``NAME[:TAG]`` of the new entry.
        operation, parents, recipe, data_files, seed, license, force, description,
            source_info: recorded as :class:`~folklm.hub.register.Derivation` fields.
        folder: write the model here instead of a temporary staging folder, for an
            operation whose output folder outlives the run (a fine-tune's run folder);
            its files are copied into the store, and the folder is removed on failure.
        started_at: ``time.time()`` when the operation began, if before the ``with``.

    Raises:
        FolkError: a bad name (before the block runs), or what ``register_model`` refuses.
    """
    ref = parse_ref(name)  # a bad output name fails before any work
    started = time.time() if started_at is None else started_at
    work = None
    if folder is None:
        home = ensure_home()
        work = Path(tempfile.mkdtemp(prefix=f".{operation}-", dir=home))
        target = work / "model"
    else:
        target = Path(folder)
    derivation = Derivation(
        operation,
        parents=list(parents),
        recipe=dict(recipe or {}),
        data_files=list(data_files),
        seed=seed,
        license=license,
        force=force,
        description=description,
        source_info=source_info,
        started_at=started,
    )
    staged = Staged(str(ref), target, derivation)
    try:
        yield staged
        staged.entry = register_model(target, staged.name, derivation, link=work is not None)
    except BaseException:
        if work is None:
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)

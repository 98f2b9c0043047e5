"""The public data sets that ship with folklm: evaluation tasks, perplexity texts, tuning data.

Each set lives in its own folder with its ``SOURCE.md`` (origin, commit, licence, and how it
was packed); the files are xz-compressed (``MANIFEST.json`` lists them with the size and
sha256 of their content). A data file is named by its path in the set's original layout,
e.g. ``arc_easy/arc_easy.jsonl`` or ``mmlu/test/anatomy_test.csv``:

    path(name)       a readable file: decompressed once into ``$FOLK_HOME/datasets``
                     (atomically, content checked against the manifest), with the set's
                     SOURCE.md beside it so licence lookups work on the copy;
    open_text(name)  the text, streamed from the compressed copy (nothing written).

``FOLK_DATA`` (or ``--data-dir``, which sets it) names a folder in the same layout
(``<set>/<file>``); a file found there is used instead of the shipped copy, so users can
point folklm at their own, fuller copies.

Layer 0: pure file access; imports nothing from folklm but its errors.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import IO

from folklm.errors import FolkError

HERE = Path(__file__).resolve().parent
SCHEME = "builtin:"  # a task spec's ``data: builtin:<name>`` names a shipped file


@cache
def manifest() -> dict[str, dict]:
    """name -> {"stored": path under this package, "bytes": size, "sha256": hex}."""
    return json.loads((HERE / "MANIFEST.json").read_text(encoding="utf-8"))


def names() -> list[str]:
    """Every shipped data file's name, sorted."""
    return sorted(manifest())


def data_dir() -> Path | None:
    """The user's data folder (``$FOLK_DATA``), or None."""
    value = os.environ.get("FOLK_DATA")
    return Path(value).expanduser() if value else None


def set_data_dir(folder: str | Path | None) -> None:
    """Use ``folder`` (laid out as ``<set>/<file>``) before the shipped copies (``--data-dir``).

    Sets ``FOLK_DATA`` so that child processes see the same folder.
    """
    if folder is None:
        os.environ.pop("FOLK_DATA", None)
        return
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise FolkError(f"--data-dir {p}: no such folder")
    os.environ["FOLK_DATA"] = str(p.resolve())


def _entry(name: str) -> dict:
    name = name.removeprefix(SCHEME)
    try:
        return manifest()[name]
    except KeyError:
        sets = sorted({n.split("/", 1)[0] for n in manifest()})
        raise FolkError(
            f"no shipped data file {name!r} (sets: {', '.join(sets)}; "
            "name a file as <set>/<file>, e.g. arc_easy/arc_easy.jsonl)"
        ) from None


def _user_copy(name: str) -> Path | None:
    root = data_dir()
    if root is None:
        return None
    p = root / name.removeprefix(SCHEME)
    return p if p.is_file() else None


def _cache_root() -> Path:
    home = Path(os.environ.get("FOLK_HOME") or Path.home() / ".folklm").expanduser()
    # one folder per manifest: a new release never reads an older release's copies
    tag = hashlib.sha256((HERE / "MANIFEST.json").read_bytes()).hexdigest()[:12]
    return home / "datasets" / tag


def _open_stored(entry: dict) -> IO[bytes]:
    stored = HERE / entry["stored"]
    if not stored.is_file():
        raise FolkError(f"{stored}: shipped data file missing (a damaged install?)")
    return lzma.open(stored) if stored.suffix == ".xz" else open(stored, "rb")


def _docs_of(name: str) -> list[Path]:
    """The set's SOURCE.md (and any licence file) to copy beside a decompressed file."""
    top = HERE / name.split("/", 1)[0]
    return [
        p
        for p in sorted(top.iterdir())
        if p.is_file()
        and not p.name.endswith(".xz")
        and p.name.upper().startswith(("SOURCE", "LICEN", "README"))
    ]


def path(name: str) -> Path:
    """A readable file holding data file ``name`` (``<set>/<file>``, ``builtin:`` optional).

    The user's copy under ``$FOLK_DATA`` when there is one; else the shipped file,
    decompressed on first use into ``$FOLK_HOME/datasets/<tag>/<name>`` (written to a
    temporary file, checked against the manifest's sha256, then renamed into place).
    """
    user = _user_copy(name)
    if user is not None:
        return user
    name = name.removeprefix(SCHEME)
    entry = _entry(name)
    if entry["stored"] == name:  # already compressed (.gz, .bz2): read in place
        return HERE / name
    root = _cache_root()
    out = root / name
    if out.is_file() and out.stat().st_size == entry["bytes"]:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    for doc in _docs_of(name):
        target = root / name.split("/", 1)[0] / doc.name
        if not target.is_file():
            _atomic_copy(doc, target)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as dst, _open_stored(entry) as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                dst.write(block)
        if h.hexdigest() != entry["sha256"]:
            raise FolkError(
                f"{HERE / entry['stored']}: content does not match MANIFEST.json's sha256 "
                "(a damaged install?)"
            )
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_text(name: str, encoding: str = "utf-8", newline: str | None = None) -> io.TextIOWrapper:
    """The text of data file ``name``, streamed (a ``.gz``/``.bz2`` name is decompressed too).

    ``newline`` as for :func:`open` (default: universal newlines, as ``Path.read_text``).
    """
    user = _user_copy(name)
    name = name.removeprefix(SCHEME)
    raw: IO[bytes] | gzip.GzipFile = (
        open(user, "rb") if user is not None else _open_stored(_entry(name))
    )
    if name.endswith(".gz"):
        raw = gzip.GzipFile(fileobj=raw)
    elif name.endswith(".bz2"):
        raw = bz2.BZ2File(raw)
    return io.TextIOWrapper(raw, encoding=encoding, newline=newline)


def read_text(name: str, encoding: str = "utf-8", newline: str | None = None) -> str:
    """The whole text of data file ``name`` (see :func:`open_text`)."""
    with open_text(name, encoding, newline) as f:
        return f.read()


def source(name: str) -> str:
    """The SOURCE.md of the set that data file ``name`` belongs to."""
    _entry(name)
    return (HERE / name.removeprefix(SCHEME).split("/", 1)[0] / "SOURCE.md").read_text(
        encoding="utf-8"
    )

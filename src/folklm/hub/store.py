"""The hub's storage: content-addressed blobs and the SQLite catalogue.

Layout under ``$FOLK_HOME/hub``::

    catalogue.sqlite        the catalogue (WAL mode), schema below
    blobs/sha256-<hex>      every file of every entry, once, read-only, named by its hash
    entries/<digest>/...    per entry, the model's file names as symlinks to the blobs, so
                            a Hugging Face folder loads (and memory-maps) from the blobs
    tmp/<pid>-...           files being written; never read from

Crash safety (a process may be killed at any instruction):

* a blob is written to ``tmp/``, fsynced, made read-only and renamed into ``blobs/``; a
  rename is atomic, so a blob file is complete or absent. A blob no entry references yet
  is harmless (``folk gc`` removes it);
* an entry's rows are written in ONE ``BEGIN IMMEDIATE`` transaction, after its blobs
  exist; SQLite's WAL makes the transaction all or nothing;
* entry folders are built in ``tmp/`` and renamed into place, and are recreated from the
  catalogue when missing, so they never need to be part of a transaction.

Concurrency: writers serialise on SQLite's write lock (``busy_timeout`` waits for it).
Blobs are only deleted while holding that lock, and a writer re-checks, under the same
lock, that every blob it is about to reference exists -- so ``rm``/``gc`` in one process
and ``import`` in another cannot leave a reference to a deleted blob.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from folklm.errors import FolkError

SCHEMA_VERSION = 1
# JSON columns hold dicts/lists written by json.dumps; timestamps are ISO 8601 UTC.
SCHEMA = """
CREATE TABLE blobs (
    sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    added_at TEXT NOT NULL
);
CREATE TABLE models (
    id INTEGER PRIMARY KEY,
    digest TEXT NOT NULL,            -- sha256 of the manifest ("sha256 size path" lines)
    format TEXT NOT NULL,            -- hf | gguf | adapter
    architecture TEXT,
    parameters INTEGER,
    quantization TEXT,
    size INTEGER NOT NULL,           -- bytes of its files
    config TEXT NOT NULL,            -- JSON: config.json, or the GGUF's hyper-parameters
    description TEXT,
    created_at TEXT NOT NULL,
    removed_at TEXT                  -- set when its last tag goes (the row stays, for lineage)
);
CREATE TABLE tags (
    name TEXT NOT NULL,
    tag TEXT NOT NULL,
    model_id INTEGER NOT NULL REFERENCES models(id),
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, tag)
);
CREATE TABLE files (
    model_id INTEGER NOT NULL REFERENCES models(id),
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL REFERENCES blobs(sha256),
    size INTEGER NOT NULL,
    PRIMARY KEY (model_id, path)
);
CREATE INDEX files_by_blob ON files(sha256);
CREATE TABLE lineage (
    child_id INTEGER NOT NULL REFERENCES models(id),
    position INTEGER NOT NULL,
    parent_id INTEGER NOT NULL REFERENCES models(id),
    parent_name TEXT NOT NULL,       -- as named when the child was made
    parent_digest TEXT NOT NULL,
    PRIMARY KEY (child_id, position)
);
CREATE INDEX lineage_by_parent ON lineage(parent_id);
CREATE TABLE recipes (
    model_id INTEGER PRIMARY KEY REFERENCES models(id),
    operation TEXT NOT NULL,         -- import | quantize | finetune | merge | adapter | ...
    recipe TEXT NOT NULL,            -- JSON: every hyper-parameter of the operation
    seed INTEGER,
    source TEXT,                     -- JSON: where imported files came from
    compute TEXT,                    -- JSON: hardware, duration, energy, ...
    environment TEXT NOT NULL,       -- JSON: folklm/python/torch versions, platform
    folklm_version TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT NOT NULL
);
CREATE TABLE data_files (
    model_id INTEGER NOT NULL REFERENCES models(id),
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    license TEXT,
    license_source TEXT,
    source TEXT,                     -- where the data set says it comes from
    PRIMARY KEY (model_id, position)
);
CREATE TABLE licenses (
    model_id INTEGER PRIMARY KEY REFERENCES models(id),
    expression TEXT,                 -- "llama3 AND cc-by-nc-4.0", NULL when unknown
    commercial INTEGER,              -- 1, 0, or NULL when unknown
    source TEXT NOT NULL,            -- where it was found, or "inherited from ..."
    notes TEXT NOT NULL,             -- JSON list: why the terms are what they are
    obligations TEXT NOT NULL,       -- JSON list: what a distributor must do
    warnings TEXT NOT NULL           -- JSON list: issued when the entry was made
);
CREATE TABLE evaluations (
    id INTEGER PRIMARY KEY,
    model_id INTEGER NOT NULL REFERENCES models(id),
    task TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    stderr REAL,
    n_samples INTEGER,
    dataset TEXT,
    dataset_sha256 TEXT,
    split TEXT,
    config TEXT NOT NULL,            -- JSON: few-shot, harness, seed, ...
    folklm_version TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX evaluations_by_model ON evaluations(model_id);
"""


def utc_now() -> str:
    """Now as ISO 8601 UTC with milliseconds (sorts as text)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex sha256, size) of a file, read in large chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def manifest_digest(files: Iterable[tuple[str, str, int]]) -> str:
    """The content hash of an entry: sha256 of its sorted ``"sha256 size path"`` lines."""
    lines = sorted(f"{sha} {size} {path}\n" for path, sha, size in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folk_home() -> Path:
    """``$FOLK_HOME`` or ``~/.folklm``: where folklm keeps its hub, cache and runs."""
    return Path(os.environ.get("FOLK_HOME") or Path.home() / ".folklm").expanduser()


def ensure_home(home: Path | None = None) -> Path:
    """Create ``$FOLK_HOME`` (or ``home``) if missing, readable by its owner only (0700):
    it holds every model, prompt cache and run of the user. An existing folder is left as
    the user set it."""
    home = home if home is not None else folk_home()
    if not home.exists():
        home.parent.mkdir(parents=True, exist_ok=True)
        home.mkdir(mode=0o700, exist_ok=True)
        os.chmod(home, 0o700)  # whatever the umask
    return home


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """One hub on disk. Open it with ``with Store() as store:``."""

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        self.home = Path(home) if home is not None else folk_home()
        self.root = self.home / "hub"
        self.blobs = self.root / "blobs"
        self.entries = self.root / "entries"
        self.tmp = self.root / "tmp"
        self.db_path = self.root / "catalogue.sqlite"
        self._conn: sqlite3.Connection | None = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def exists(self) -> bool:
        """Whether a catalogue has been created (read-only commands never create one)."""
        return self.db_path.is_file()

    # -- SQLite ---------------------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            ensure_home(self.home)
            for folder in (self.blobs, self.entries, self.tmp):
                folder.mkdir(parents=True, exist_ok=True)
            try:
                conn = sqlite3.connect(self.db_path, timeout=120, isolation_level=None)
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA busy_timeout = 120000")
                _set_wal(conn)
                # FULL: a committed entry survives a power cut, not only a killed process.
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA foreign_keys = ON")
            except sqlite3.DatabaseError as e:
                raise FolkError(f"{self.db_path}: cannot open the hub catalogue ({e})") from None
            self._conn = conn
            self._migrate()
        return self._conn

    def _migrate(self) -> None:
        conn = self._conn
        assert conn is not None
        if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        with self.write() as c:  # re-read under the lock: another process may have won
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise FolkError(
                    f"{self.db_path}: catalogue schema {version} is newer than this folklm "
                    f"understands ({SCHEMA_VERSION}); upgrade folklm"
                )
            if version == 0:
                # executescript() would commit; run the statements inside this transaction
                # (no ';' inside the schema's comments).
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        c.execute(statement)
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed, or none of it."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs."""
        conn = self.conn
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    # -- blobs ----------------------------------------------------------------------------
    def blob_path(self, sha: str) -> Path:
        return self.blobs / f"sha256-{sha}"

    def has_blob(self, sha: str, size: int) -> bool:
        try:
            return self.blob_path(sha).stat().st_size == size
        except FileNotFoundError:
            return False

    def put(self, src: Path, *, link: bool = False, known: tuple[str, int] | None = None):
        """Store the file ``src`` as a blob; return ``(sha256, size)``.

        The file is hashed first, so a file already in the store is not copied again.
        ``link=True`` hard-links instead of copying (only for files folklm owns and will
        not modify, e.g. its own conversion cache); it falls back to a copy across file
        systems.
        """
        sha, size = known or sha256_file(src)
        if self.has_blob(sha, size):
            return sha, size
        ensure_home(self.home)
        for folder in (self.tmp, self.blobs):
            folder.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{os.getpid()}-{secrets.token_hex(8)}.blob"
        try:
            linked = False
            if link:
                try:
                    os.link(src, tmp)
                    linked = True
                except OSError:
                    pass
            if not linked:
                self._copy_checked(src, tmp, sha)
            os.chmod(tmp, stat.S_IRUSR)  # 0400: the owner's, and immutable by mistake
            os.replace(tmp, self.blob_path(sha))
            _fsync_dir(self.blobs)
        finally:
            if tmp.exists():
                tmp.unlink()
        return sha, size

    @staticmethod
    def _copy_checked(src: Path, dst: Path, sha: str) -> None:
        """Copy and hash in one pass; the copy must hash to what the source hashed to."""
        h = hashlib.sha256()
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            while chunk := fin.read(1 << 22):
                h.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        if h.hexdigest() != sha:
            raise FolkError(f"{src}: the file changed while it was being imported; try again")

    def retire(self, conn: sqlite3.Connection, model_id: int, now: str) -> list[str]:
        """Mark a model that has no tag left as removed and drop its file rows (inside the
        caller's transaction). Returns its blobs, for :meth:`release` after the commit; the
        ``models`` row stays, so lineage still shows it."""
        if conn.execute("SELECT 1 FROM tags WHERE model_id = ?", (model_id,)).fetchone():
            return []
        shas = [
            r[0] for r in conn.execute("SELECT sha256 FROM files WHERE model_id = ?", (model_id,))
        ]
        conn.execute("DELETE FROM files WHERE model_id = ?", (model_id,))
        conn.execute("UPDATE models SET removed_at = ? WHERE id = ?", (now, model_id))
        return shas

    def release(self, candidates: Iterable[str]) -> list[str]:
        """Delete those ``candidates`` no entry references; returns the deleted hashes.

        Called after the transaction that dropped the references has committed, in a new
        write transaction that re-checks them: a blob is never deleted while a committed
        row (or one about to commit) still needs it. Killed half-way, the rest stay behind
        unreferenced, for ``gc``.
        """
        candidates = sorted(set(candidates))
        if not candidates:
            return []
        removed = []
        with self.write() as conn:
            for sha in candidates:
                if conn.execute("SELECT 1 FROM files WHERE sha256 = ? LIMIT 1", (sha,)).fetchone():
                    continue
                self.blob_path(sha).unlink(missing_ok=True)
                conn.execute("DELETE FROM blobs WHERE sha256 = ?", (sha,))
                removed.append(sha)
        return removed

    def drop_entry_folders(self, digests: Iterable[str]) -> None:
        """Remove the entry folders of ``digests`` no live model has (after a commit)."""
        with self.read() as conn:
            for digest in set(digests):
                live = conn.execute(
                    "SELECT 1 FROM models WHERE digest = ? AND removed_at IS NULL", (digest,)
                ).fetchone()
                if not live:
                    shutil.rmtree(self.entries / digest, ignore_errors=True)

    # -- entry folders --------------------------------------------------------------------
    def entry_folder(self, digest: str, files: list[tuple[str, str]]) -> Path:
        """``entries/<digest>``: the entry's files as symlinks to its blobs.

        Built in ``tmp/`` and renamed into place, so it is complete or absent; a folder
        with a missing link (someone deleted it) is rebuilt.
        """
        folder = self.entries / digest
        if folder.is_dir() and all(os.path.lexists(folder / p) for p, _ in files):
            return folder
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.entries.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-entry-", dir=self.tmp))
        try:
            for path, sha in files:
                link = staging / path
                link.parent.mkdir(parents=True, exist_ok=True)
                # Relative: tmp/<x>/ and entries/<digest>/ are at the same depth.
                os.symlink(os.path.relpath(self.blob_path(sha), link.parent), link)
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.rename(staging, folder)
            except OSError:
                if not folder.is_dir():  # not a concurrent process that got there first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    # -- garbage --------------------------------------------------------------------------
    def sweep(self, conn: sqlite3.Connection, live_digests: set[str]) -> dict[str, int]:
        """Remove what no live entry needs (inside a write transaction).

        Unreferenced blobs (rows and files, including files a killed import left without
        a row), entry folders of removed entries, and temporary files of dead processes.
        """
        referenced = {r[0] for r in conn.execute("SELECT DISTINCT sha256 FROM files")}
        rows = {r[0] for r in conn.execute("SELECT sha256 FROM blobs")}
        removed_blobs = freed = 0
        for sha in rows - referenced:
            conn.execute("DELETE FROM blobs WHERE sha256 = ?", (sha,))
        for path in self.blobs.glob("*") if self.blobs.is_dir() else ():
            sha = path.name.removeprefix("sha256-")
            if sha not in referenced:
                freed += path.stat().st_size if path.is_file() else 0
                path.unlink()
                removed_blobs += 1
        removed_entries = 0
        for folder in self.entries.glob("*") if self.entries.is_dir() else ():
            if folder.name not in live_digests:
                shutil.rmtree(folder, ignore_errors=True)
                removed_entries += 1
        removed_tmp = 0
        for path in self.tmp.glob("*") if self.tmp.is_dir() else ():
            pid = path.name.split("-", 1)[0]
            stale = not pid.isdigit() or not _pid_alive(int(pid))
            if stale or time.time() - path.lstat().st_mtime > 24 * 3600:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed_tmp += 1
        return {
            "blobs": removed_blobs,
            "bytes": freed,
            "entry_folders": removed_entries,
            "temporary": removed_tmp,
        }


def _set_wal(conn: sqlite3.Connection, patience: float = 120.0) -> None:
    """Switch to WAL, retrying while another process holds the lock.

    Changing the journal mode of a new database needs an exclusive lock, and SQLite answers
    SQLITE_BUSY at once (without its busy handler) when two first connections race for it.
    Once one of them has switched, the mode is persistent and the others see "wal".
    """
    deadline = time.monotonic() + patience
    delay = 0.01
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay + secrets.randbelow(1000) / 100_000)
            delay = min(delay * 2, 0.5)

"""Models from other tools' caches: a Hugging Face cache snapshot and an Ollama store.

Both caches keep each file once, named by its hash, so the hub can take the files without
copying them: each is cloned into the hub's staging folder (a reflink where the file system
has one, else a hard link when on the same file system and owned by this user, else a
copy), re-hashed there and checked against the hash the cache names it by, then registered
through :func:`folklm.hub.register.register_model` like any import. A file that does not
hash to its name is refused and nothing is registered.

* Hugging Face cache (``~/.cache/huggingface/hub``, see
  https://huggingface.co/docs/huggingface_hub/guides/manage-cache):
  ``models--ORG--NAME/snapshots/COMMIT/FILE`` is a symlink to ``../../blobs/ETAG``, the
  ETag being the file's sha256 for LFS files and its git blob sha1 otherwise. Each link is
  resolved explicitly and must land in that repository's own ``blobs/``.
* Ollama store (``~/.ollama/models`` or ``$OLLAMA_MODELS``):
  ``manifests/HOST/NAMESPACE/MODEL/TAG`` is a registry manifest whose layers are
  ``blobs/sha256-HEX`` (see :mod:`folklm.hub.ollama`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from folklm.errors import FolkError
from folklm.hub import ollama
from folklm.hub.api import import_path
from folklm.hub.catalogue import Entry
from folklm.hub.license_files import front_matter
from folklm.hub.licenses import split_expression
from folklm.hub.names import parse_ref, suggest_ref
from folklm.hub.register import Derivation, register_model
from folklm.hub.store import Store

# (what, bytes done, total bytes or None): called as a transfer proceeds.
Progress = Callable[[str, int, "int | None"], None]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX40 = re.compile(r"[0-9a-f]{40}")
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Expected:
    """What a file must hash to (any field left ``None`` is not checked)."""

    sha256: str | None = None
    git_sha1: str | None = None
    size: int | None = None


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file: sha1 of ``b"blob SIZE\\0" + content`` (a Hub ETag)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_file(path: Path, expected: Expected, what: str) -> str:
    """Hash ``path`` and compare with ``expected``; returns the sha256.

    Raises:
        FolkError: the size or a hash differs (one line naming ``what`` and both values).
    """
    size = path.stat().st_size
    if expected.size is not None and size != expected.size:
        raise FolkError(f"{what}: {size} bytes, expected {expected.size}; refused (corrupted)")
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    digest = sha.hexdigest()
    if expected.sha256 is not None and digest != expected.sha256:
        raise FolkError(
            f"{what}: sha256 {digest[:16]}… does not match the expected "
            f"{expected.sha256[:16]}…; refused (corrupted or tampered)"
        )
    if expected.git_sha1 is not None and (got := git_blob_sha1(path)) != expected.git_sha1:
        raise FolkError(
            f"{what}: git blob sha1 {got[:16]}… does not match the expected "
            f"{expected.git_sha1[:16]}…; refused (corrupted or tampered)"
        )
    return digest


def clone_file(src: Path, dst: Path, *, hardlink: bool = True) -> str:
    """Put ``src``'s content at ``dst`` without copying where possible.

    Returns ``"reflink"`` (copy-on-write clone: a later change to either file leaves the
    other as it was), ``"hardlink"`` (same inode; only with ``hardlink`` and for files this
    user owns, since the hub makes its blobs read-only) or ``"copy"``.
    """
    src = Path(os.path.realpath(src))  # link the file, never a symlink to it
    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
        return "reflink"
    except OSError:
        dst.unlink(missing_ok=True)
    if hardlink and src.stat().st_uid == os.geteuid():
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError:
            pass
    shutil.copyfile(src, dst)
    return "copy"


def staging_folder(store: Store) -> Path:
    """A new folder in the hub's ``tmp/`` (same file system as the blobs; a killed process
    leaves it for ``folk gc``, which knows it by the pid in its name)."""
    store.tmp.mkdir(parents=True, exist_ok=True)
    folder = store.tmp / f"{os.getpid()}-stage-{secrets.token_hex(6)}"
    folder.mkdir()
    return folder


def register_verified(
    files: Mapping[str, Path],
    expected: Mapping[str, Expected],
    name: str,
    derivation: Derivation,
    *,
    what: str,
) -> tuple[Entry, dict[str, str]]:
    """Clone ``files`` ({path in entry: file}) into staging, check each against
    ``expected``, then register them as one entry.

    A single ``.gguf`` file becomes a GGUF entry, anything else a folder entry. Returns
    the entry and how each file got there (``reflink``/``hardlink``/``copy``).

    Raises:
        FolkError: a file does not match what it should hash to; nothing is registered.
    """
    parse_ref(name)  # a bad name fails before any file is touched
    with Store() as store:
        folder = staging_folder(store)
    try:
        methods: dict[str, str] = {}
        for rel, src in files.items():
            dst = folder / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            methods[rel] = clone_file(src, dst)
            check_file(dst, expected.get(rel, Expected()), f"{what}: {rel}")
        single = len(files) == 1 and next(iter(files)).endswith(".gguf")
        source = folder / next(iter(files)) if single else folder
        return register_model(source, name, derivation, link=True), methods
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- Hugging Face cache -------------------------------------------------------------------
def hf_cache_dir() -> Path:
    """The Hugging Face cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (read now, not when ``huggingface_hub`` was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "huggingface"
    )
    return Path(home).expanduser() / "hub"


def is_hf_snapshot(path: Path) -> bool:
    """Whether ``path`` is ``.../models--ORG--NAME/snapshots/REV``."""
    return path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--")


@dataclass
class Snapshot:
    """Files of a Hugging Face cache snapshot, each with what it must hash to."""

    repo_id: str
    commit: str
    files: dict[str, Path]
    expected: dict[str, Expected]


def hf_snapshot(path: Path, only: list[str] | None = None) -> Snapshot:
    """Read a cache snapshot folder; ``only`` limits it to those files.

    Raises:
        FolkError: not a snapshot folder, a link that leaves the repository's ``blobs/``
            or does not resolve, or a file of ``only`` that is missing.
    """
    path = Path(os.path.abspath(path))
    if not is_hf_snapshot(path) or not path.is_dir():
        raise FolkError(
            f"{path}: not a Hugging Face cache snapshot (models--ORG--NAME/snapshots/REV)"
        )
    repo_dir = path.parent.parent
    blobs = Path(os.path.realpath(repo_dir / "blobs"))
    repo_id = repo_dir.name.removeprefix("models--").replace("--", "/", 1)
    names: list[str] = []
    for root, dirs, filenames in os.walk(path):  # never follows a link to a folder
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = Path(root).relative_to(path)
        names += [(rel_root / f).as_posix() for f in sorted(filenames) if not f.startswith(".")]
    if only is not None:
        missing = sorted(set(only) - set(names))
        if missing:
            raise FolkError(f"{path}: {missing[0]} is not in this snapshot")
        names = [n for n in names if n in set(only)]
    files: dict[str, Path] = {}
    expected: dict[str, Expected] = {}
    for rel in names:
        link = path / rel
        if link.is_symlink():
            target = Path(os.path.realpath(link))
            if target.parent != blobs:
                raise FolkError(
                    f"{link}: the link points to {target}, outside the cache's {blobs}; refused"
                )
            if not target.is_file():
                raise FolkError(f"{link}: the link's blob {target.name} is missing")
            blob = target.name
            expected[rel] = Expected(
                sha256=blob if _HEX64.fullmatch(blob) else None,
                git_sha1=blob if _HEX40.fullmatch(blob) else None,
            )
            files[rel] = target
        elif link.is_file():  # a cache written without symlinks (Windows): no hash to check
            files[rel] = link
            expected[rel] = Expected()
        else:
            raise FolkError(f"{link}: not a regular file")
    if not files:
        raise FolkError(f"{path}: the snapshot holds no files")
    return Snapshot(repo_id, path.name, files, expected)


def readme_license(path: Path | None) -> str | None:
    """The ``license:`` of a model card's front matter (``license_name`` for ``other``)."""
    if path is None or not path.is_file():
        return None
    meta = front_matter(path.read_text(encoding="utf-8", errors="replace")[: 1 << 20])
    value = meta.get("license")
    if isinstance(value, str) and value.lower() == "other":
        value = meta.get("license_name")
    return value if isinstance(value, str) and split_expression(value) else None


def import_hf_snapshot(
    path: Path,
    name: str | None = None,
    license: str | None = None,
    *,
    only: list[str] | None = None,
    expected: Mapping[str, Expected] | None = None,
    source_info: Mapping[str, Any] | None = None,
) -> tuple[Entry, dict[str, str]]:
    """Register a Hugging Face cache snapshot (``folk import .../snapshots/REV``).

    ``expected`` adds hashes known from elsewhere (the Hub's API, for a pull) to the ones
    the blobs are named by; ``source_info`` replaces the recorded source.
    """
    snap = hf_snapshot(path, only)
    checks = dict(snap.expected)
    for rel, e in (expected or {}).items():
        own = checks.get(rel, Expected())
        checks[rel] = Expected(
            sha256=e.sha256 or own.sha256,
            git_sha1=e.git_sha1 or own.git_sha1,
            size=e.size if e.size is not None else own.size,
        )
    ggufs = [r for r in snap.files if r.endswith(".gguf")]
    files = snap.files
    license_source = None
    stem = snap.repo_id.rsplit("/", 1)[-1]
    if "config.json" not in files and len(ggufs) == 1:
        # One GGUF: the entry is that file; the model card (if fetched) gives the licence
        # when the file itself does not say.
        stem = ggufs[0].rsplit("/", 1)[-1].removesuffix(".gguf")
        files = {f"{stem}.gguf": snap.files[ggufs[0]]}
        checks = {f"{stem}.gguf": checks[ggufs[0]]}
        card = readme_license(snap.files.get("README.md"))
        if license is None and card and not _gguf_has_license(snap.files[ggufs[0]]):
            license = card
            license_source = f"README.md of hf:{snap.repo_id}@{snap.commit}"
    elif "config.json" not in files and len(ggufs) > 1:
        raise FolkError(
            f"hf:{snap.repo_id} has {len(ggufs)} GGUF files here; import one: "
            f"hf:{snap.repo_id}/{ggufs[0]}"
        )
    if name is None:
        name = str(suggest_ref(stem))
    info: dict[str, Any] = (
        dict(source_info)
        if source_info
        else {
            "origin": "huggingface-cache",
            "path": str(path),
            "repo": snap.repo_id,
            "commit": snap.commit,
        }
    )
    records: dict[str, Any] = dict(info.get("files") or {})
    for rel, e in checks.items():
        records.setdefault(rel, {k: v for k, v in vars(e).items() if v is not None})
    info["files"] = records
    d = Derivation("import", license=license, license_source=license_source, source_info=info)
    return register_verified(files, checks, name, d, what=f"hf:{snap.repo_id}")


def _gguf_has_license(path: Path) -> bool:
    # lazy: the GGUF reader (numpy) loads only when a GGUF is imported
    from folklm.checkpoint.gguf_reader import open_gguf, read_metadata

    value = read_metadata(open_gguf(path)).get("general.license")
    return isinstance(value, str) and bool(value.strip())


# -- Ollama store ---------------------------------------------------------------------------
def ollama_models_dir(override: str | os.PathLike | None = None) -> Path:
    """The Ollama store: ``override``, else ``$OLLAMA_MODELS``, else ``~/.ollama/models``."""
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def import_ollama_store(
    spec: str,
    name: str | None = None,
    license: str | None = None,
    *,
    models_dir: str | os.PathLike | None = None,
) -> tuple[Entry, dict[str, str]]:
    """Register model ``NAME[:TAG]`` of a local Ollama store (``folk import ollama:NAME``).

    Raises:
        FolkError: no such model in the store, a missing blob, or a blob that does not
            hash to its digest; nothing is registered then.
    """
    ref = ollama.parse_name(spec)
    root = ollama_models_dir(models_dir)
    manifest_path = root / "manifests" / ref.manifest_path
    if not manifest_path.is_file():
        raise FolkError(f"ollama:{ref} is not in the Ollama store {root} (no {manifest_path})")
    raw = manifest_path.read_bytes()
    manifest = ollama.parse_manifest(raw, str(manifest_path))

    def blob(layer: ollama.Layer) -> Path:
        path = root / "blobs" / layer.digest.replace(":", "-")
        if not path.is_file():
            raise FolkError(f"ollama:{ref}: blob {layer.digest} is missing from {root / 'blobs'}")
        return path

    texts = {
        layer.digest: ollama.read_text_layer(blob(layer), layer, f"ollama:{ref}")
        for layer in manifest.text_layers
    }
    config = ollama.read_config(blob(manifest.config), manifest.config, f"ollama:{ref}")
    model = manifest.model_layer
    info = ollama.source_record(
        manifest,
        texts,
        config,
        origin="ollama-store",
        where=str(manifest_path),
        ref=ref,
        manifest_digest="sha256:" + hashlib.sha256(raw).hexdigest(),
    )
    lic, lic_source = (license, None) if license else ollama.layer_license(manifest, texts)
    d = Derivation("import", license=lic, license_source=lic_source, source_info=info)
    files = {ref.file_name: blob(model)}
    expected = {ref.file_name: Expected(sha256=model.hex, size=model.size)}
    return register_verified(files, expected, name or ref.hub_name, d, what=f"ollama:{ref}")


def json_text(value: Any) -> str:
    """Compact JSON as Ollama writes its params and config blobs."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# -- one entry point for `folk import` ------------------------------------------------------
def hf_cached_snapshot(spec: str) -> tuple[Path, list[str] | None]:
    """The cache snapshot of ``hf:ORG/REPO[/FILE.gguf][@REVISION]`` (revision: a branch
    or tag the cache has a ref for, or a commit); ``only`` is the file, if one is named.

    Raises:
        FolkError: the repository or revision is not in the cache.
    """
    body = spec.removeprefix("hf:")
    body, _, revision = body.rpartition("@") if "@" in body else (body, "", "main")
    parts = body.split("/")
    if len(parts) < 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise FolkError(f"invalid Hugging Face reference {spec!r}: expected hf:ORG/REPO[@REVISION]")
    repo = f"{parts[0]}/{parts[1]}"
    file = "/".join(parts[2:]) or None
    repo_dir = hf_cache_dir() / f"models--{parts[0]}--{parts[1]}"
    ref_file = repo_dir / "refs" / revision
    commit = ref_file.read_text().strip() if ref_file.is_file() else revision
    snapshot = repo_dir / "snapshots" / commit
    if not revision or "/" in commit or not snapshot.is_dir():
        raise FolkError(
            f"hf:{repo}@{revision} is not in the Hugging Face cache {hf_cache_dir()}; "
            f"`folk pull hf:{repo}` downloads it"
        )
    if file is None:
        return snapshot, None
    return snapshot, [file] + (["README.md"] if (snapshot / "README.md").exists() else [])


def import_source(
    spec: str | os.PathLike,
    name: str | None = None,
    license: str | None = None,
    *,
    ollama_models: str | os.PathLike | None = None,
) -> tuple[Entry, dict[str, str]]:
    """``folk import``: ``hf:ORG/REPO[@REV]`` or a snapshot folder from the Hugging Face
    cache, ``ollama:NAME[:TAG]`` from the Ollama store (both linked, not copied), else a
    folder or GGUF file (:func:`folklm.hub.api.import_path`, copied).

    Returns the entry and, for cache imports, how each file entered the hub.
    """
    text = os.fspath(spec)
    if text.startswith("hf:"):
        snapshot, only = hf_cached_snapshot(text)
        return import_hf_snapshot(snapshot, name, license, only=only)
    if text.startswith("ollama:"):
        return import_ollama_store(text, name, license, models_dir=ollama_models)
    path = Path(text).expanduser()
    if path.is_dir() and is_hf_snapshot(Path(os.path.abspath(path))):
        return import_hf_snapshot(path, name, license)
    return import_path(path, name, license), {}

"""Writing entries: :func:`register_model`, the one function every model-making operation calls.

It stores the files as blobs (outside any lock: copying can take minutes), then writes in
ONE transaction the entry's tag, files, parents (with their content hashes), operation and
full recipe, the sha256 and licence of every data file used, the seed, the environment
(folklm/python/torch versions, hardware), timestamps, and the licence terms derived from
the parents and the data (:func:`folklm.hub.licenses.derive`). Everything that can be
refused (a bad name, an unknown parent, a licence conflict, not a model) is checked before
anything is written.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath
from typing import Any

from folklm.errors import FolkError
from folklm.hub import catalogue
from folklm.hub.catalogue import Entry
from folklm.hub.license_files import data_license, model_license
from folklm.hub.licenses import Terms, derive, split_expression
from folklm.hub.modelinfo import ModelInfo, inspect_path
from folklm.hub.names import ModelRef, parse_ref
from folklm.hub.store import Store, manifest_digest, sha256_file, utc_now


class HubWarning(UserWarning):
    """A licence or naming issue recorded with an entry (the entry is still written)."""


@dataclass(frozen=True)
class DataFile:
    """A data file an operation used; ``license`` overrides what its SOURCE.md/README says."""

    path: str | os.PathLike
    license: str | None = None


def folklm_version() -> str:
    try:
        return version("folklm")
    except PackageNotFoundError:
        return "unknown"


def _environment() -> dict[str, Any]:
    """Where the operation ran. torch is reported only if the caller already imported it."""
    env: dict[str, Any] = {
        "folklm": folklm_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch"] = getattr(torch, "__version__", None)
        cuda = getattr(torch, "cuda", None)
        if cuda is not None and cuda.is_available():
            env["accelerator"] = f"{cuda.device_count()} x {cuda.get_device_name(0)}"
    return env


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise FolkError(f"{what} must be JSON-serialisable ({e})") from None


def _loads(text: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def _emit(entry: Entry) -> Entry:
    for message in entry.warnings:
        warnings.warn(message, HubWarning, stacklevel=3)
    return entry


# -- writing entries ------------------------------------------------------------------------
def _inspect_source(source: str | os.PathLike | Mapping[str, str | os.PathLike], staging: Path):
    """ModelInfo for a folder, a .gguf file, or a mapping {path in entry: file on disk}."""
    if isinstance(source, Mapping):
        for rel, target in source.items():
            parts = PurePosixPath(rel).parts
            if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
                raise FolkError(f"invalid file name {rel!r} in the entry: use a relative path")
            if any(p.startswith(".") for p in parts):
                raise FolkError(f"invalid file name {rel!r} in the entry: hidden files are skipped")
            link = staging / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(Path(target).resolve(), link)
        if len(source) == 1 and next(iter(source)).endswith(".gguf"):
            return inspect_path(staging / next(iter(source)))
        return inspect_path(staging, confine=False)  # links to the files the caller named
    return inspect_path(Path(source).expanduser())


def _data_records(items: Iterable[str | os.PathLike | DataFile]) -> list[dict[str, Any]]:
    records = []
    for item in items:
        declared = item.license if isinstance(item, DataFile) else None
        path = Path(item.path if isinstance(item, DataFile) else item).expanduser().resolve()
        paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        if not path.exists():
            raise FolkError(f"{path}: data file not found")
        for p in paths:
            sha, size = sha256_file(p)
            found = data_license(p)
            ids = split_expression(declared) if declared else found.ids
            source = "given by the caller" if declared else found.source
            records.append(
                {
                    "name": p.name,
                    "path": str(p),
                    "sha256": sha,
                    "size": size,
                    "ids": ids,
                    "license_source": source,
                    "source": found.description,
                }
            )
    return records


def _parent_terms(conn, row) -> Terms:
    lic = catalogue.license_of(conn, row["id"])
    return Terms(ids=split_expression(lic["expression"]), source=lic["source"])


@dataclass
class Derivation:
    """How a model was made: what :func:`register_model` records besides its files.

    Attributes:
        operation: what made the model: ``import``, ``quantize``, ``finetune``, ``merge``,
            ``adapter``, ``dpo``, ``distill`` ...
        parents: registry names of the models it was made from (merges: several).
        recipe: every hyper-parameter of the operation (JSON-serialisable).
        data_files: files (or folders) of data used; each is hashed, and its licence read
            from the SOURCE.md/README beside it unless given as ``DataFile(path, license)``.
        seed: the random seed of the operation.
        license: licence id or expression declared for the new model; for an import it
            overrides what the files say.
        license_source: where a declared ``license`` comes from (for the record).
        force: record it even if the parents' licences conflict (reasons are kept).
        compute: e.g. ``{"flops": 1.2e15, "energy_kwh": 0.02, "hardware": "1 x H100"}``.
        started_at: ``time.time()`` when the operation began (duration is recorded).
        description: intended use / a sentence for the model card.
        source_info: provenance of imported files (path, URL, sha256 of a source file).
    """

    operation: str
    parents: Sequence[str] = ()
    recipe: Mapping[str, Any] | None = None
    data_files: Sequence[str | os.PathLike | DataFile] = ()
    seed: int | None = None
    license: str | None = None
    license_source: str | None = None
    force: bool = False
    compute: Mapping[str, Any] | None = None
    started_at: float | None = None
    description: str | None = None
    source_info: Mapping[str, Any] | None = None


@dataclass
class _Pending:
    """An entry validated, hashed and stored as blobs: what the one transaction writes."""

    ref: ModelRef
    derivation: Derivation
    info: ModelInfo
    digest: str
    manifest: list[tuple[str, str, int]]
    parents: list[ModelRef]
    terms: Terms
    data: list[dict[str, Any]]
    recipe_json: str
    compute_json: str | None
    source_json: str | None


def register_model(
    source: str | os.PathLike | Mapping[str, str | os.PathLike],
    name: str,
    derivation: Derivation | str,
    *,
    link: bool = False,
) -> Entry:
    """Record a model in the hub: the one function every model-making operation calls.

    Operations call it through :func:`folklm.hub.derive.derive`, which stages, times and
    cleans up around it.

    Args:
        source: a Hugging Face folder, a ``.gguf`` file, or ``{path in entry: file}``.
        name: ``name[:tag]`` of the new entry; an existing tag is moved to it.
        derivation: how the model was made (:class:`Derivation`); a bare operation name
            (``"import"``) for a model with nothing else to record.
        link: hard-link the files into the store instead of copying them; only for files
            the caller owns and will not modify (a temporary output folder).

    Returns:
        The new entry, with ``warnings`` (licence and naming) also issued as
        :class:`HubWarning`.

    Raises:
        FolkError: invalid name, unknown parent, not a model, or a licence conflict
            (``LicenseConflict``) without ``force``; nothing is written then.
    """
    d = Derivation(derivation) if isinstance(derivation, str) else derivation
    ref = parse_ref(name)
    if not d.operation or not d.operation.replace("_", "").replace("-", "").isalnum():
        raise FolkError(f"invalid operation {d.operation!r}: use a word such as 'finetune'")
    recipe_json = _json(dict(d.recipe or {}), "recipe")
    compute_json = _json(dict(d.compute), "compute") if d.compute else None
    source_json = _json(dict(d.source_info), "source_info") if d.source_info else None
    parent_refs = [parse_ref(p) for p in d.parents]
    if len(set(parent_refs)) != len(parent_refs):
        raise FolkError("the same parent is listed twice")
    with tempfile.TemporaryDirectory(prefix="folk-register-") as staging:
        info = _inspect_source(source, Path(staging))
        if d.operation == "import" and "folklm.lineage" in info.gguf_metadata:
            # A GGUF exported by folklm says where it came from: keep that claim.
            claims = json.loads(source_json) if source_json else {}
            claims["embedded_lineage"] = _loads(info.gguf_metadata["folklm.lineage"])
            claims["embedded_content_hash"] = info.gguf_metadata.get("folklm.content_hash")
            source_json = _json(claims, "source_info")
        data = _data_records(d.data_files)
        with Store() as store:
            # Validate against the catalogue before writing anything.
            terms = _derive_terms(store, ref, d, parent_refs, info, data)
            hashed = {rel: store.put(path, link=link) for rel, path in info.files.items()}
            manifest = [(rel, sha, size) for rel, (sha, size) in hashed.items()]
            pending = _Pending(
                ref=ref,
                derivation=d,
                info=info,
                digest=manifest_digest(manifest),
                manifest=manifest,
                parents=parent_refs,
                terms=terms,
                data=data,
                recipe_json=recipe_json,
                compute_json=compute_json,
                source_json=source_json,
            )
            entry = _commit(store, pending, link)
            store.entry_folder(pending.digest, [(rel, sha) for rel, sha, _ in manifest])
    return _emit(entry)


def _derive_terms(store, ref, d: Derivation, parent_refs, info, data) -> Terms:
    operation, license = d.operation, d.license
    parents: list[tuple[str, Terms]] = []
    if parent_refs:
        if not store.exists():
            raise FolkError(f"unknown model '{parent_refs[0]}'; see folk ls")
        with store.read() as conn:
            for p in parent_refs:
                parents.append((str(p), _parent_terms(conn, catalogue.require_model(conn, p))))
    explicit = split_expression(license) if license else None
    found = None
    if operation == "import" and not explicit:
        found = model_license(info.files, info.gguf_metadata)
        explicit = found.ids or None
    data_terms = [(f["name"], f["ids"]) for f in data]
    terms = derive(operation, ref.name, parents, data_terms, explicit, force=d.force)
    if license and d.license_source:
        terms.source = d.license_source
    elif license:
        terms.source = "declared by the caller (--license)"
    elif found is not None:
        terms.source = found.source
    elif parents:
        terms.source = "inherited from " + ", ".join(p for p, _ in parents)
    if not terms.ids:
        terms.warnings.append(f"no licence found for {ref}; pass --license SPDX-ID")
    return terms


def _commit(store: Store, p: _Pending, link: bool) -> Entry:
    ref, info, manifest, digest, terms = p.ref, p.info, p.manifest, p.digest, p.terms
    operation, started_at = p.derivation.operation, p.derivation.started_at
    now = utc_now()
    total_size = sum(size for _, _, size in manifest)
    env = _environment()
    compute = json.loads(p.compute_json) if p.compute_json else {}
    if started_at is not None:
        compute.setdefault("duration_s", round(time.time() - started_at, 3))
    if operation != "import":
        compute.setdefault(
            "hardware", env.get("accelerator") or f"{env['cpu_count']} x {env['cpu']}"
        )
    started = (
        datetime.fromtimestamp(started_at, timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
        if started_at is not None
        else None
    )
    replaced: list[str] = []
    with store.write() as conn:
        existing = catalogue.find_model(conn, ref)
        if existing is not None and existing["digest"] == digest and operation == "import":
            same = conn.execute(
                "SELECT operation FROM recipes WHERE model_id = ?", (existing["id"],)
            ).fetchone()
            if same and same["operation"] == "import":  # re-importing the same files: no-op
                entry = catalogue.load_entry(conn, existing, str(ref))
                entry.warnings = [f"{ref} already holds these files; nothing changed"]
                return entry
        parent_rows = [catalogue.require_model(conn, r) for r in p.parents]
        # Under the write lock no rm/gc can run: any blob missing now (deleted by one that
        # ran while we copied) is stored again before it is referenced.
        for rel, sha, size in manifest:
            if not store.has_blob(sha, size):
                store.put(info.files[rel], link=link, known=(sha, size))
            conn.execute(
                "INSERT OR IGNORE INTO blobs (sha256, size, added_at) VALUES (?, ?, ?)",
                (sha, size, now),
            )
        mid = conn.execute(
            "INSERT INTO models (digest, format, architecture, parameters, quantization, size, "
            "config, description, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                digest,
                info.format,
                info.architecture,
                info.parameters,
                info.quantization,
                total_size,
                _json(info.config, "config"),
                p.derivation.description,
                now,
            ),
        ).lastrowid
        assert mid is not None  # an INSERT sets lastrowid
        conn.executemany(
            "INSERT INTO files (model_id, path, sha256, size) VALUES (?, ?, ?, ?)",
            [(mid, rel, sha, size) for rel, sha, size in manifest],
        )
        conn.executemany(
            "INSERT INTO lineage (child_id, position, parent_id, parent_name, parent_digest) "
            "VALUES (?, ?, ?, ?, ?)",
            [
                (mid, i, row["id"], str(r), row["digest"])
                for i, (r, row) in enumerate(zip(p.parents, parent_rows, strict=True))
            ],
        )
        conn.execute(
            "INSERT INTO recipes (model_id, operation, recipe, seed, source, compute, "
            "environment, folklm_version, started_at, finished_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                mid,
                operation,
                p.recipe_json,
                p.derivation.seed,
                p.source_json,
                _json(compute, "compute") if compute else None,
                _json(env, "environment"),
                env["folklm"],
                started,
                now,
            ),
        )
        conn.executemany(
            "INSERT INTO data_files (model_id, position, name, path, sha256, size, license, "
            "license_source, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    mid,
                    i,
                    d["name"],
                    d["path"],
                    d["sha256"],
                    d["size"],
                    " AND ".join(d["ids"]) or None,
                    d["license_source"],
                    d["source"],
                )
                for i, d in enumerate(p.data)
            ],
        )
        commercial = terms.commercial
        conn.execute(
            "INSERT INTO licenses (model_id, expression, commercial, source, notes, "
            "obligations, warnings) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                mid,
                terms.expression,
                None if commercial is None else int(commercial),
                terms.source,
                _json(terms.notes, "notes"),
                _json(terms.obligations, "obl"),
                _json(terms.warnings, "warnings"),
            ),
        )
        if existing is not None:
            replaced.append(f"{ref} moved from sha256:{catalogue.short(existing['digest'])}")
        released = _point_tag(store, conn, ref, mid, now)
        entry = catalogue.load_entry(
            conn, conn.execute("SELECT * FROM models WHERE id = ?", (mid,)).fetchone(), str(ref)
        )
    if existing is not None:
        store.release(released)
        store.drop_entry_folders([existing["digest"]])
    entry.warnings = terms.warnings + replaced
    return entry


def _point_tag(store: Store, conn, ref: ModelRef, model_id: int, now: str) -> list[str]:
    """Point ``ref`` at ``model_id``; a model left without tags is retired. Returns the
    retired model's blobs, to release after the commit."""
    old = catalogue.find_model(conn, ref)
    conn.execute(
        "INSERT INTO tags (name, tag, model_id, created_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (name, tag) DO UPDATE SET model_id = excluded.model_id, "
        "created_at = excluded.created_at",
        (ref.name, ref.tag, model_id, now),
    )
    if old is None or old["id"] == model_id:
        return []
    return store.retire(conn, old["id"], now)

"""Hub upkeep: remove and tag entries, verify blobs, collect garbage, attach evaluations.

Each function is one transaction on the catalogue; blobs are deleted only under the write
lock (see :mod:`folklm.hub.store`). Re-exported by :mod:`folklm.hub.api`.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

from folklm.errors import FolkError
from folklm.hub import catalogue
from folklm.hub.licenses import check_name, split_expression
from folklm.hub.names import parse_ref
from folklm.hub.register import HubWarning, _json, folklm_version
from folklm.hub.store import Store, sha256_file, utc_now


def _store_or_unknown(name: str) -> Store:
    store = Store()
    if not store.exists():
        raise FolkError(f"unknown model '{parse_ref(name)}'; see folk ls")
    return store


def _release(store: Store, retired: dict[str, tuple[list[dict], list[str]]]) -> dict[str, Any]:
    """Release the blobs of retired models (after the commit); per model what happened."""
    deleted = set(store.release(sha for _, shas in retired.values() for sha in shas))
    out = {}
    for name, (files, shas) in retired.items():
        out[name] = {
            "deleted_blobs": len(set(shas) & deleted),
            "freed_bytes": sum(f["size"] for f in files if f["sha256"] in deleted),
            "kept_shared_blobs": len(set(shas) - deleted),
        }
    return out


def remove(name: str) -> dict[str, Any]:
    """Remove the tag ``name``; once a model has no tag left its files are released and the
    blobs no other entry uses are deleted (its record stays, so lineage keeps it)."""
    return remove_many([name])[0]


def remove_many(names: list[str]) -> list[dict[str, Any]]:
    """Remove several tags in one transaction: all of them, or none if one is unknown."""
    refs = [parse_ref(n) for n in names]
    if not refs:
        return []
    reports: list[dict[str, Any]] = []
    retired: dict[str, tuple[list[dict], list[str]]] = {}
    digests = []
    with _store_or_unknown(names[0]) as store:
        with store.write() as conn:
            rows = [catalogue.require_model(conn, ref) for ref in refs]
            now = utc_now()
            for ref, row in zip(refs, rows, strict=True):
                deleted = conn.execute(
                    "DELETE FROM tags WHERE name = ? AND tag = ?", (ref.name, ref.tag)
                ).rowcount
                if not deleted:
                    raise FolkError(f"unknown model '{ref}'; see folk ls")  # listed twice
                others = catalogue.tags_of(conn, row["id"])
                reports.append({"removed": str(ref), "other_tags": others})
                if not others:
                    files = catalogue.files_of(conn, row["id"])
                    retired[str(ref)] = (files, store.retire(conn, row["id"], now))
                    digests.append(row["digest"])
        released = _release(store, retired)
        store.drop_entry_folders(digests)
    for report in reports:
        report.update(released.get(report["removed"], {}))
    return reports


def tag(src: str, dst: str) -> catalogue.Entry:
    """Give the model ``src`` a second name ``dst`` (moving ``dst`` if it exists)."""
    source, target = parse_ref(src), parse_ref(dst)
    with _store_or_unknown(src) as store:
        with store.write() as conn:
            row = catalogue.require_model(conn, source)
            old = catalogue.find_model(conn, target)
            now = utc_now()
            conn.execute(
                "INSERT INTO tags (name, tag, model_id, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name, tag) DO UPDATE SET model_id = excluded.model_id",
                (target.name, target.tag, row["id"], now),
            )
            released = []
            if old is not None and old["id"] != row["id"]:
                released = store.retire(conn, old["id"], now)
            entry = catalogue.load_entry(conn, row, str(target))
        if released:
            assert old is not None  # blobs are released only when an old entry was retired
            store.release(released)
            store.drop_entry_folders([old["digest"]])
    ids = split_expression(entry.license.get("expression"))
    entry.warnings = check_name(target.name, ids, entry.operation)
    for message in entry.warnings:
        warnings.warn(message, HubWarning, stacklevel=2)
    return entry


def verify(name: str | None = None) -> dict[str, Any]:
    """Re-hash every blob (of ``name``, or of all entries) and check the catalogue.

    Returns ``{"checked", "bytes", "problems": [{"entries", "file", "sha256", "problem"}],
    "catalogue": "ok" | ...}``; ``problems`` empty means every file is intact.
    """
    store = Store()
    if name is None and not store.exists():
        return {"checked": 0, "bytes": 0, "problems": [], "catalogue": "ok", "unreferenced": 0}
    if name is not None:
        store = _store_or_unknown(name)
    with store:
        with store.read() as conn:
            if name is not None:
                rows = [catalogue.require_model(conn, parse_ref(name))]
            else:
                rows = conn.execute("SELECT * FROM models WHERE removed_at IS NULL").fetchall()
            users: dict[str, list[tuple[str, str]]] = {}
            sizes: dict[str, int] = {}
            for row in rows:
                label = ", ".join(catalogue.tags_of(conn, row["id"])) or f"#{row['id']}"
                for f in catalogue.files_of(conn, row["id"]):
                    users.setdefault(f["sha256"], []).append((label, f["path"]))
                    sizes[f["sha256"]] = f["size"]
            integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
            dangling = conn.execute("PRAGMA foreign_key_check").fetchall()
            referenced = {r[0] for r in conn.execute("SELECT DISTINCT sha256 FROM files")}
        problems = []
        total = 0
        for sha in sorted(users):
            path = store.blob_path(sha)
            problem: str | None
            if not path.is_file():
                problem = "blob missing"
            else:
                actual, size = sha256_file(path)
                total += size
                problem = None if actual == sha else f"content changed (now sha256:{actual[:12]})"
            if problem:
                for label, file in users[sha]:
                    problems.append(
                        {"entries": label, "file": file, "sha256": sha, "problem": problem}
                    )
        on_disk = {p.name.removeprefix("sha256-") for p in store.blobs.glob("sha256-*")}
    status = (
        "ok" if integrity == "ok" and not dangling else f"{integrity}; {len(dangling)} dangling"
    )
    if status != "ok":
        problems.append(
            {"entries": "-", "file": str(store.db_path), "sha256": "", "problem": status}
        )
    return {
        "checked": len(users),
        "bytes": total,
        "problems": problems,
        "catalogue": status,
        "unreferenced": len(on_disk - referenced),
    }


def collect_garbage() -> dict[str, int]:
    """Delete blobs no entry references, folders of removed entries, stale temporary files."""
    store = Store()
    if not store.exists():
        return {"blobs": 0, "bytes": 0, "entry_folders": 0, "temporary": 0}
    with store, store.write() as conn:
        live = {r[0] for r in conn.execute("SELECT digest FROM models WHERE removed_at IS NULL")}
        return store.sweep(conn, live)


def add_evaluation(
    name: str,
    task: str,
    metric: str,
    value: float,
    stderr: float | None = None,
    *,
    n_samples: int | None = None,
    dataset: str | os.PathLike | None = None,
    split: str | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Attach an evaluation result to the model ``name`` (shown in its card's model-index).

    Args:
        task: e.g. ``arc_easy``, ``perplexity``, ``inference``.
        metric: e.g. ``acc``, ``acc_norm``, ``perplexity``, ``decode_tokens_per_s``.
        dataset: a data file or folder (hashed, so the result is reproducible) or a name.
        config: how it was measured: few-shot count, harness and version, seed, hardware.
    """
    ref = parse_ref(name)
    for label, x in (("value", value), ("stderr", stderr)):
        if x is not None and (not isinstance(x, (int, float)) or not math.isfinite(x)):
            raise FolkError(f"evaluation {label} must be a finite number, got {x!r}")
    if not task or not metric:
        raise FolkError("an evaluation needs a task and a metric")
    dataset_name, dataset_sha = None, None
    if dataset is not None:
        p = Path(dataset).expanduser()
        if p.is_file():
            dataset_name, dataset_sha = str(p.resolve()), sha256_file(p)[0]
        else:
            dataset_name = str(dataset)
    record = {
        "task": task,
        "metric": metric,
        "value": float(value),
        "stderr": None if stderr is None else float(stderr),
        "n_samples": n_samples,
        "dataset": dataset_name,
        "dataset_sha256": dataset_sha,
        "split": split,
        "config": config or {},
        "folklm_version": folklm_version(),
        "created_at": utc_now(),
    }
    with _store_or_unknown(name) as store, store.write() as conn:
        row = catalogue.require_model(conn, ref)
        conn.execute(
            "INSERT INTO evaluations (model_id, task, metric, value, stderr, n_samples, dataset, "
            "dataset_sha256, split, config, folklm_version, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row["id"],
                *(
                    record[k]
                    for k in (
                        "task",
                        "metric",
                        "value",
                        "stderr",
                        "n_samples",
                        "dataset",
                        "dataset_sha256",
                        "split",
                    )
                ),
                _json(record["config"], "config"),
                record["folklm_version"],
                record["created_at"],
            ),
        )
    return {"model": str(ref), **record}

"""Reading the catalogue back: entries, their files, lineage and evaluations.

Everything here is a SELECT on a connection the caller holds (inside ``Store.read()`` for
a consistent snapshot); the write side lives in :mod:`folklm.hub.register`.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Any

from folklm.errors import FolkError
from folklm.hub.names import ModelRef


def short(digest: str) -> str:
    return digest[:12]


@dataclass
class Entry:
    """One model in the hub, as ``folk show`` reports it."""

    name: str
    id: int
    digest: str
    format: str
    architecture: str | None
    parameters: int | None
    quantization: str | None
    size: int
    created_at: str
    removed: bool
    license: dict[str, Any]
    operation: str
    recipe: dict[str, Any]
    seed: int | None
    source: dict[str, Any] | None
    compute: dict[str, Any] | None
    environment: dict[str, Any]
    folklm_version: str
    started_at: str | None
    description: str | None
    config: dict[str, Any]
    tags: list[str] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    parents: list[dict[str, Any]] = field(default_factory=list)
    data_files: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # issued by the call that returned it

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["content_hash"] = f"sha256:{self.digest}"
        return out


def find_model(conn: sqlite3.Connection, ref: ModelRef) -> sqlite3.Row | None:
    return conn.execute(
        "SELECT m.* FROM tags t JOIN models m ON m.id = t.model_id WHERE t.name = ? AND t.tag = ?",
        (ref.name, ref.tag),
    ).fetchone()


def require_model(conn: sqlite3.Connection, ref: ModelRef) -> sqlite3.Row:
    row = find_model(conn, ref)
    if row is None:
        raise FolkError(f"unknown model '{ref}'; see folk ls")
    return row


def tags_of(conn: sqlite3.Connection, model_id: int) -> list[str]:
    rows = conn.execute(
        "SELECT name, tag FROM tags WHERE model_id = ? ORDER BY created_at, name, tag", (model_id,)
    )
    return [f"{r['name']}:{r['tag']}" for r in rows]


def files_of(conn: sqlite3.Connection, model_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT path, sha256, size FROM files WHERE model_id = ? ORDER BY path", (model_id,)
    )
    return [dict(r) for r in rows]


def license_of(conn: sqlite3.Connection, model_id: int) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM licenses WHERE model_id = ?", (model_id,)).fetchone()
    if row is None:
        return {"expression": None, "commercial": None, "source": "unknown"}
    commercial = row["commercial"]
    return {
        "expression": row["expression"],
        "commercial": None if commercial is None else bool(commercial),
        "source": row["source"],
        "notes": json.loads(row["notes"]),
        "obligations": json.loads(row["obligations"]),
        "warnings": json.loads(row["warnings"]),
    }


def parents_of(conn: sqlite3.Connection, model_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT l.parent_id, l.parent_name, l.parent_digest, m.removed_at FROM lineage l "
        "JOIN models m ON m.id = l.parent_id WHERE l.child_id = ? ORDER BY l.position",
        (model_id,),
    )
    return [
        {
            "name": r["parent_name"],
            "content_hash": f"sha256:{r['parent_digest']}",
            "tags": tags_of(conn, r["parent_id"]),
            "removed": r["removed_at"] is not None,
            "license": license_of(conn, r["parent_id"])["expression"],
        }
        for r in rows
    ]


def evaluations_of(conn: sqlite3.Connection, model_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT task, metric, value, stderr, n_samples, dataset, dataset_sha256, split, config, "
        "folklm_version, created_at FROM evaluations WHERE model_id = ? ORDER BY id",
        (model_id,),
    )
    out = []
    for r in rows:
        d = dict(r)
        d["config"] = json.loads(d["config"])
        out.append(d)
    return out


def load_entry(conn: sqlite3.Connection, row: sqlite3.Row, name: str) -> Entry:
    """The full record of the model ``row`` (a ``models`` row), shown as ``name``."""
    mid = row["id"]
    recipe = conn.execute("SELECT * FROM recipes WHERE model_id = ?", (mid,)).fetchone()
    data = conn.execute(
        "SELECT name, path, sha256, size, license, license_source, source FROM data_files "
        "WHERE model_id = ? ORDER BY position",
        (mid,),
    )
    return Entry(
        name=name,
        id=mid,
        digest=row["digest"],
        format=row["format"],
        architecture=row["architecture"],
        parameters=row["parameters"],
        quantization=row["quantization"],
        size=row["size"],
        created_at=row["created_at"],
        removed=row["removed_at"] is not None,
        license=license_of(conn, mid),
        operation=recipe["operation"],
        recipe=json.loads(recipe["recipe"]),
        seed=recipe["seed"],
        source=json.loads(recipe["source"]) if recipe["source"] else None,
        compute=json.loads(recipe["compute"]) if recipe["compute"] else None,
        environment=json.loads(recipe["environment"]),
        folklm_version=recipe["folklm_version"],
        started_at=recipe["started_at"],
        description=row["description"],
        config=json.loads(row["config"]),
        tags=tags_of(conn, mid),
        files=files_of(conn, mid),
        parents=parents_of(conn, mid),
        data_files=[dict(r) for r in data],
        evaluations=evaluations_of(conn, mid),
    )


def list_rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """One row per tag, for ``folk ls``."""
    rows = conn.execute(
        "SELECT t.name, t.tag, m.id, m.digest, m.format, m.architecture, m.parameters, "
        "m.quantization, m.size, m.created_at, l.expression, l.commercial, r.operation "
        "FROM tags t JOIN models m ON m.id = t.model_id "
        "LEFT JOIN licenses l ON l.model_id = m.id LEFT JOIN recipes r ON r.model_id = m.id "
        "ORDER BY t.name, t.tag"
    )
    out = []
    for r in rows:
        out.append(
            {
                "name": f"{r['name']}:{r['tag']}",
                "content_hash": f"sha256:{r['digest']}",
                "format": r["format"],
                "architecture": r["architecture"],
                "parameters": r["parameters"],
                "size": r["size"],
                "quantization": r["quantization"],
                "license": r["expression"],
                "commercial": None if r["commercial"] is None else bool(r["commercial"]),
                "operation": r["operation"],
                "created_at": r["created_at"],
                "parents": [p["name"] for p in parents_of(conn, r["id"])],
            }
        )
    return out


@dataclass
class LineageNode:
    """A model in an ancestry tree: what made it, its content hash and its licence."""

    name: str
    content_hash: str
    operation: str
    license: str | None
    commercial: bool | None
    created_at: str
    removed: bool
    recipe: dict[str, Any]
    parents: list[LineageNode] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lineage_tree(conn: sqlite3.Connection, model_id: int, name: str, depth: int = 0) -> LineageNode:
    row = conn.execute(
        "SELECT m.digest, m.created_at, m.removed_at, r.operation, r.recipe FROM models m "
        "JOIN recipes r ON r.model_id = m.id WHERE m.id = ?",
        (model_id,),
    ).fetchone()
    lic = license_of(conn, model_id)
    node = LineageNode(
        name=name,
        content_hash=f"sha256:{row['digest']}",
        operation=row["operation"],
        license=lic["expression"],
        commercial=lic["commercial"],
        created_at=row["created_at"],
        removed=row["removed_at"] is not None,
        recipe=json.loads(row["recipe"]),
    )
    if depth < 64:  # lineage is acyclic (parents exist first); the bound is a safety net
        edges = conn.execute(
            "SELECT parent_id, parent_name FROM lineage WHERE child_id = ? ORDER BY position",
            (model_id,),
        ).fetchall()
        for e in edges:
            node.parents.append(lineage_tree(conn, e["parent_id"], e["parent_name"], depth + 1))
    return node


def render_tree(node: LineageNode) -> str:
    """The ancestry as text: one line per model, children above their parents."""
    lines: list[str] = []

    def label(n: LineageNode) -> str:
        lic = n.license or "licence unknown"
        if n.commercial is False and "non-commercial" not in lic:
            lic += " (non-commercial)"
        gone = "  [removed]" if n.removed else ""
        return f"{n.name}  {n.operation}  sha256:{short(n.content_hash[7:])}  {lic}{gone}"

    def walk(n: LineageNode, prefix: str, last: bool, root: bool) -> None:
        if root:
            lines.append(label(n))
            child_prefix = ""
        else:
            lines.append(f"{prefix}{'└── ' if last else '├── '}{label(n)}")
            child_prefix = prefix + ("    " if last else "│   ")
        for i, p in enumerate(n.parents):
            walk(p, child_prefix, i == len(n.parents) - 1, False)

    walk(node, "", True, True)
    return "\n".join(lines)

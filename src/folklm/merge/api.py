"""``merge_models``: run a recipe and record the result in the local hub.

The merged folder is written in a :func:`folklm.hub.derive.derive` context (staged under
``$FOLK_HOME``, so the files are hard-linked into the store rather than copied), which
registers it with operation ``merge`` (``lora_fuse`` for an
adapter fused into its base), every registry input as a parent (their content hashes are
recorded by the hub), the full YAML text and parsed recipe, the content hash of every
input given by path and of every adapter, and the seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from folklm.hub import api
from folklm.hub.catalogue import Entry
from folklm.hub.derive import derive
from folklm.hub.modelinfo import collect_files
from folklm.hub.names import parse_ref
from folklm.hub.store import manifest_digest, sha256_file
from folklm.merge.config import MergeConfig, load_config
from folklm.merge.executor import MergeStats, open_inputs, run_merge
from folklm.merge.inputs import OpenModel


@dataclass
class MergeReport:
    entry: Entry
    stats: MergeStats
    inputs: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        e = self.entry
        one_model = max(self.stats.input_weight_bytes or [0])
        return {
            "name": e.name,
            "hash": f"sha256:{e.digest}",
            "operation": e.operation,
            "parents": [{"name": p["name"], "content_hash": p["content_hash"]} for p in e.parents],
            "inputs": self.inputs,
            "tensors": self.stats.tensors,
            "bytes_written": self.stats.bytes_written,
            "seconds": round(self.stats.seconds, 3),
            "peak_rss_bytes": self.stats.peak_rss_bytes,
            "largest_input_bytes": one_model,
            "peak_rss_over_model": round(self.stats.peak_rss_bytes / one_model, 3)
            if one_model
            else None,
            "seed": e.seed,
        }


def _folder_hash(folder: Path) -> str:
    files = collect_files(folder)
    return "sha256:" + manifest_digest(
        [(rel, *sha256_file(path)) for rel, path in sorted(files.items())]
    )


def _dump(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def describe_inputs(
    base: OpenModel | None, others: list[OpenModel]
) -> tuple[list[dict[str, Any]], list[str]]:
    """(a record per input with its content hash, the registry parents in order)."""
    records: list[dict[str, Any]] = []
    parents: list[str] = []
    roles: list[tuple[str, OpenModel]] = [("base", base)] if base is not None else []
    for role, m in roles + [("model", o) for o in others]:
        rec: dict[str, Any] = {"role": role, "model": m.spec.ref}
        if m.registry is not None:
            rec["registry"] = m.registry
            rec["content_hash"] = f"sha256:{api.show(m.registry).digest}"
            if m.registry not in parents:
                parents.append(m.registry)
        else:
            rec["path"] = str(m.folder.resolve())
            rec["content_hash"] = _folder_hash(m.folder)
        if m.spec.adapter is not None:
            rec["adapter"] = str(Path(m.spec.adapter).expanduser().resolve())
            rec["adapter_hash"] = _folder_hash(Path(m.spec.adapter).expanduser())
        records.append(rec)
    return records, parents


def merge_models(
    config: str | Path | MergeConfig,
    out_name: str,
    *,
    yaml_text: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    license: str | None = None,
    force: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> MergeReport:
    """Run a merge recipe (a YAML path or a parsed config) and register ``out_name``.

    Raises:
        FolkError: a bad recipe, input or name; nothing is registered then.
    """
    started = time.time()
    parse_ref(out_name)  # a bad name fails before any work
    if isinstance(config, MergeConfig):
        cfg = config
    else:
        path = Path(config).expanduser()
        cfg = load_config(path)
        yaml_text = path.read_text(encoding="utf-8")
    opened = open_inputs(cfg)
    inputs, parents = describe_inputs(*opened)
    recipe = {
        "merge_method": cfg.method,
        "config": cfg.raw,
        "yaml": yaml_text if yaml_text is not None else _dump(cfg.raw),
        "inputs": inputs,
    }
    derivation = derive(
        out_name,
        "lora_fuse" if cfg.method == "lora_fuse" else "merge",
        parents=parents,
        recipe=recipe,
        seed=cfg.seed,
        license=license,
        force=force,
        description=f"{cfg.method} merge of " + ", ".join(r["model"] for r in inputs),
        started_at=started,
    )
    with derivation as d:
        stats = run_merge(
            cfg, d.folder, max_shard_bytes=max_shard_bytes, progress=progress, opened=opened
        )
    assert d.entry is not None  # registered when the with block ended without error
    return MergeReport(d.entry, stats, inputs)

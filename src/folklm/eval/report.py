"""Evaluation results out of the process: rows, a JSON file, a bar chart, the hub catalogue.

Results go into the hub with :func:`folklm.hub.api.add_evaluation` (one row per task and
metric, with its standard error, item count, data file hash and settings), so the model
card's ``model-index`` lists them; ``compare`` reads two entries' latest rows back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from folklm.errors import FolkError
from folklm.hub.api import add_evaluation, show


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric), groups after their subtasks."""
    out = []
    for section in ("results", "groups"):
        for task, r in results.get(section, {}).items():
            for metric, value in r["metrics"].items():
                out.append(
                    {
                        "task": task,
                        "metric": metric,
                        "value": value,
                        "stderr": r["stderr"].get(metric),
                        "n": r["n"],
                    }
                )
    return out


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename): never a half-written results file."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p


def bar_chart(table: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Horizontal bars of the accuracy-like metrics (0..1) with ±stderr error bars."""
    # lazy: matplotlib takes ~0.5 s to import and only charts need it
    import matplotlib

    matplotlib.use("Agg")
    # pyplot after the Agg backend is chosen
    import matplotlib.pyplot as plt

    shown = [r for r in table if r["metric"].startswith(("acc", "exact_match"))]
    if not shown:  # perplexity-only runs: plot bits per byte instead
        shown = [r for r in table if r["metric"] == "bits_per_byte"]
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(shown), 2) + 1.2))
    labels = [f"{r['task']} {r['metric']}" for r in shown]
    values = [r["value"] for r in shown]
    errors = [r["stderr"] or 0.0 for r in shown]
    ax.barh(range(len(shown)), values, xerr=errors, color="#4c72b0", capsize=3)
    ax.set_yticks(range(len(shown)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("score (± standard error)")
    ax.set_title(title)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    fig.tight_layout()
    tmp = p.with_name(f".{p.stem}.tmp-{os.getpid()}{p.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(p)
    return p


def store(name: str, results: dict[str, Any], config: dict[str, Any]) -> int:
    """Record every metric of ``results`` on registry entry ``name``; returns rows written."""
    written = 0
    for section in ("results", "groups"):
        for task, r in results.get(section, {}).items():
            for metric, value in r["metrics"].items():
                add_evaluation(
                    name,
                    task,
                    metric,
                    float(value),
                    r["stderr"].get(metric),
                    n_samples=r["n"],
                    dataset=r.get("data"),
                    split=r.get("split"),
                    config={**config, "num_fewshot": r.get("num_fewshot", 0)},
                )
                written += 1
    return written


def latest_evaluations(name: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The newest stored result of each (task, metric) of registry entry ``name``."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in show(name).evaluations:  # ordered by id: later rows replace earlier ones
        out[(r["task"], r["metric"])] = r
    return out


def compare(a: str, b: str) -> list[dict[str, Any]]:
    """Rows of the (task, metric) pairs evaluated on both entries, with B - A."""
    ea, eb = latest_evaluations(a), latest_evaluations(b)
    common = sorted(set(ea) & set(eb))
    if not common:
        raise FolkError(
            f"{a} and {b} have no evaluated task in common; run folk eval on both first"
        )
    out = []
    for task, metric in common:
        ra, rb = ea[(task, metric)], eb[(task, metric)]
        out.append(
            {
                "task": task,
                "metric": metric,
                "a": ra["value"],
                "a_stderr": ra["stderr"],
                "b": rb["value"],
                "b_stderr": rb["stderr"],
                "diff": rb["value"] - ra["value"],
                "n_a": ra["n_samples"],
                "n_b": rb["n_samples"],
            }
        )
    return out

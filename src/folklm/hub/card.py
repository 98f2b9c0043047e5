"""Model cards: a Hugging Face ``README.md`` written from an entry's record.

Follows the Hugging Face model card specification (huggingface.co/docs/hub/model-cards)
and the sections of Mitchell et al. (2019), "Model Cards for Model Reporting": YAML front
matter with ``license``, ``base_model`` (a list for merges), ``base_model_relation``,
``datasets``, ``tags``, ``pipeline_tag`` and a ``model-index`` holding every evaluation
stored for the model; then intended use, training data, training procedure (from the
recorded recipe), evaluation, limitations, licence, lineage tree and the transparency
report (:mod:`folklm.hub.transparency`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from folklm.errors import FolkError
from folklm.hub import api
from folklm.hub.catalogue import Entry, LineageNode, render_tree
from folklm.hub.licenses import BY_ID, split_expression
from folklm.hub.transparency import report, to_markdown

RELATIONS = {"quantize": "quantized", "merge": "merge", "adapter": "adapter", "lora": "adapter"}
# Licence ids the Hugging Face Hub lists; others are written as ``other`` + ``license_name``.
HF_LICENSE_IDS = {lic.id for lic in BY_ID.values()} - {"qwen", "qwen-research", "mrl"}


def _yaml(value: Any, indent: int = 0) -> list[str]:
    """YAML for nested dicts/lists of scalars (JSON scalars are valid YAML scalars)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{k}:")
                lines.extend(_yaml(v, indent + 2))
            else:
                lines.append(f"{pad}{k}: {json.dumps(v, ensure_ascii=False)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                sub = _yaml(item, indent + 2)
                lines.append(f"{pad}- {sub[0].lstrip()}")
                lines.extend(sub[1:])
            else:
                lines.append(f"{pad}- {json.dumps(item, ensure_ascii=False)}")
    return lines


def relation(operation: str) -> str | None:
    """``base_model_relation`` for an operation (None for imports: a base model)."""
    if operation == "import":
        return None
    return RELATIONS.get(operation, "finetune")


def front_matter(entry: Entry) -> dict[str, Any]:
    ids = split_expression(entry.license.get("expression"))
    meta: dict[str, Any] = {}
    if len(ids) == 1 and ids[0] in HF_LICENSE_IDS:
        meta["license"] = ids[0]
    elif ids:
        meta["license"] = "other"
        meta["license_name"] = "-and-".join(ids)
        first = BY_ID.get(ids[0])
        if first:
            meta["license_link"] = first.url
    else:
        meta["license"] = "unknown"
    if entry.parents:
        names = [p["name"].removesuffix(":latest") for p in entry.parents]
        meta["base_model"] = names
        meta["base_model_relation"] = relation(entry.operation)
    datasets = sorted({d["name"] for d in entry.data_files})
    if datasets:
        meta["datasets"] = datasets
    tags = ["folklm", "text-generation"]
    if entry.format == "gguf":
        tags.append("gguf")
    if entry.license.get("commercial") is False:
        tags.append("non-commercial")
    if entry.operation != "import":
        tags.append(entry.operation)
    meta["tags"] = tags
    meta["pipeline_tag"] = "text-generation"
    meta["library_name"] = "gguf" if entry.format == "gguf" else "transformers"
    if entry.evaluations:
        meta["model-index"] = [{"name": entry.name, "results": _results(entry)}]
    return meta


def _results(entry: Entry) -> list[dict[str, Any]]:
    results = []
    for r in entry.evaluations:
        metric: dict[str, Any] = {"type": r["metric"], "value": r["value"], "name": r["metric"]}
        if r.get("stderr") is not None:
            metric["name"] = f"{r['metric']} (stderr {r['stderr']:.4g})"
        if r["config"]:
            metric["args"] = r["config"]
        dataset: dict[str, Any] = {"name": Path(r["dataset"]).name if r["dataset"] else r["task"]}
        dataset["type"] = r["task"]
        if r.get("split"):
            dataset["split"] = r["split"]
        results.append(
            {
                "task": {"type": "text-generation", "name": r["task"]},
                "dataset": dataset,
                "metrics": [metric],
                "source": {"name": f"folklm {r['folklm_version']}", "url": "local evaluation"},
            }
        )
    return results


def _operation_phrase(operation: str) -> str:
    rel = relation(operation)
    return operation if rel == operation else f"{rel} ({operation})"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(out)


def render(entry: Entry, tree: LineageNode) -> str:
    """The card's Markdown, front matter included."""
    lic = entry.license
    parts = ["---", *_yaml(front_matter(entry)), "---", "", f"# {entry.name}", ""]
    made = (
        "Imported into folklm's local hub"
        if entry.operation == "import"
        else f"A {_operation_phrase(entry.operation)} of "
        + ", ".join(f"`{p['name']}`" for p in entry.parents)
    )
    parts += [
        f"{made} on {entry.created_at[:10]} with folklm {entry.folklm_version}. "
        f"Architecture `{entry.architecture}`, {entry.parameters or 0:,} parameters, "
        f"{entry.quantization}, content hash `sha256:{entry.digest}`.",
        "",
        "## Intended use",
        "",
        entry.description or "Text generation. The maker recorded no specific intended use.",
        "",
    ]
    restrictions = [o for o in lic.get("obligations", []) if "use" in o or "commercial" in o]
    if restrictions:
        parts += ["Restrictions from the licence terms:", ""]
        parts += [f"- {r}" for r in restrictions] + [""]
    parts += ["## Training data", ""]
    if entry.data_files:
        rows = [
            [
                d["name"],
                f"`{d['sha256'][:16]}`",
                f"{d['size']:,}",
                d["license"] or "unknown",
                d["source"] or "-",
            ]
            for d in entry.data_files
        ]
        parts += [_table(["file", "sha256", "bytes", "licence", "source"], rows), ""]
    elif entry.operation == "import":
        parts += ["Not recorded here: see the upstream model's documentation.", ""]
    else:
        parts += [f"None: `{entry.operation}` used no data.", ""]
    parts += ["## Training procedure", "", f"- operation: `{entry.operation}`"]
    for p in entry.parents:
        parts.append(f"- parent: `{p['name']}` ({p['content_hash']}, licence {p['license']})")
    if entry.seed is not None:
        parts.append(f"- seed: {entry.seed}")
    if entry.compute:
        parts.append("- compute: " + ", ".join(f"{k} {v}" for k, v in entry.compute.items()))
    if entry.source:
        parts.append("- source: " + json.dumps(entry.source, ensure_ascii=False))
    env = entry.environment
    parts.append(
        f"- environment: folklm {env.get('folklm')}, python {env.get('python')}"
        + (f", torch {env['torch']}" if env.get("torch") else "")
        + f", {env.get('platform')}"
    )
    parts += ["", "Recipe (every recorded hyper-parameter):", "", "```json"]
    parts += [json.dumps(entry.recipe, indent=2, sort_keys=True, ensure_ascii=False), "```", ""]
    parts += ["## Evaluation", ""]
    if entry.evaluations:
        rows = [
            [
                r["task"],
                r["metric"],
                f"{r['value']:.4g}",
                "-" if r["stderr"] is None else f"{r['stderr']:.2g}",
                r["n_samples"] or "-",
                r["created_at"][:10],
            ]
            for r in entry.evaluations
        ]
        parts += [_table(["task", "metric", "value", "stderr", "n", "date"], rows), ""]
    else:
        parts += ["No evaluation results are recorded for this model.", ""]
    parts += ["## Limitations", "", *_limitations(entry), ""]
    parts += ["## Licence", "", f"`{lic.get('expression') or 'unknown'}` ({lic.get('source')})."]
    commercial = {True: "permitted", False: "not permitted", None: "unknown"}
    parts += [f"Commercial use: {commercial[lic.get('commercial')]}.", ""]
    for title, key in (("Why", "notes"), ("Obligations", "obligations"), ("Warnings", "warnings")):
        if lic.get(key):
            parts += [f"{title}:", ""] + [f"- {x}" for x in lic[key]] + [""]
    parts += ["## Lineage", "", "```text", render_tree(tree), "```", ""]
    parts += ["## Transparency report", "", to_markdown(report(entry, tree)), ""]
    rows = [[f"`{f['path']}`", f"{f['size']:,}", f"`{f['sha256']}`"] for f in entry.files]
    parts += ["## Files", "", _table(["file", "bytes", "sha256"], rows), ""]
    return "\n".join(parts)


def _limitations(entry: Entry) -> list[str]:
    out = [
        "- A language model produces fluent text that can be wrong, biased or unsafe; check "
        "its output before relying on it."
    ]
    if entry.parameters and entry.parameters < 1_000_000_000:
        out.append(f"- At {entry.parameters:,} parameters its knowledge and reasoning are limited.")
    if entry.operation == "quantize" or (entry.quantization or "").upper().startswith(("Q", "IQ")):
        out.append("- Quantized weights: some accuracy is lost relative to the parent.")
    if entry.data_files and len(entry.data_files) < 5:
        total = sum(d["size"] for d in entry.data_files)
        out.append(f"- Trained on little data ({total:,} bytes); expect narrow behaviour.")
    if not entry.evaluations:
        out.append("- Not evaluated: its quality is unmeasured.")
    return out


def model_card(name: str) -> str:
    """The model card of registry entry ``name``."""
    return render(api.show(name), api.lineage(name))


def write_card(name: str, out: str | Path, force: bool = False) -> Path:
    """Write ``out/README.md`` (refusing to overwrite one unless ``force``)."""
    text = model_card(name)
    folder = Path(out).expanduser()
    path = folder / "README.md"
    if path.exists() and not force:
        raise FolkError(f"{path} exists; pass --force to overwrite it")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".README.md.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path

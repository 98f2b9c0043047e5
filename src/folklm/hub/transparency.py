"""Transparency report: an entry scored against the Foundation Model Transparency Index.

The FMTI (Bommasani et al., 2023, "The Foundation Model Transparency Index",
arXiv:2310.12941; indicator list: github.com/stanford-crfm/fmti, ``fmti-indicators.csv``)
has 100 indicators across upstream (data, labour, compute, methods), model and downstream
domains. Most concern a developer organisation (wages of data labourers, government
inquiries, usage reports) and no local record can answer them. This module scores the
indicators a *derivative* can satisfy from what the hub records about it: its data files
with hashes and licences, the compute and duration of the operation, the method and
recipe, evaluations, the licence and its use policy, versioning by content hash and
lineage. Each is ``met``, ``unmet`` (the record could hold it and does not) or
``unknown`` (it happened upstream, before the model was imported); the score is the share
of met indicators, with the evidence for each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from folklm.hub.catalogue import Entry, LineageNode
from folklm.hub.licenses import BY_ID, split_expression

MET, UNMET, UNKNOWN = "met", "unmet", "unknown"
Check = Callable[[Entry, LineageNode], tuple[str, str]]


@dataclass
class Indicator:
    domain: str
    subdomain: str
    name: str  # as in fmti-indicators.csv
    status: str
    evidence: str


def _imported(e: Entry) -> bool:
    return e.operation == "import"


def _upstream(e: Entry, what: str) -> tuple[str, str]:
    return UNKNOWN, f"{what} belongs to the upstream developer (imported model)"


def _roots(tree: LineageNode) -> list[LineageNode]:
    if not tree.parents:
        return [tree]
    return [r for p in tree.parents for r in _roots(p)]


def _no_data(e: Entry, tree: LineageNode) -> tuple[str, str]:
    """An operation that used no data (quantize, merge, export) carries its ancestors' data:
    at the roots of every lineage is an imported model whose training data is upstream."""
    roots = sorted({f"{r.name} ({r.operation})" for r in _roots(tree)})
    return UNKNOWN, (
        f"'{e.operation}' used no data, so the model's data is its ancestors'; it goes back to "
        f"{', '.join(roots)}, whose training data belongs to the upstream developer"
    )


def _data_size(e: Entry, tree: LineageNode) -> tuple[str, str]:
    if _imported(e):
        return _upstream(e, "the training data")
    if not e.data_files:
        return _no_data(e, tree)
    total = sum(d["size"] for d in e.data_files)
    return MET, f"{len(e.data_files)} data file(s), {total:,} bytes"


def _data_sources(e: Entry, tree: LineageNode) -> tuple[str, str]:
    if _imported(e):
        return _upstream(e, "the training data")
    if not e.data_files:
        return _no_data(e, tree)
    named = [d for d in e.data_files if d.get("source")]
    listed = "; ".join(f"{d['name']} (sha256:{d['sha256'][:12]})" for d in e.data_files)
    if len(named) == len(e.data_files):
        return MET, listed + " -- " + "; ".join(sorted({d["source"] for d in named}))
    return UNMET, f"files hashed ({listed}) but no SOURCE.md/README says where they come from"


def _data_license(e: Entry, tree: LineageNode) -> tuple[str, str]:
    if _imported(e):
        return _upstream(e, "the training data")
    if not e.data_files:
        return _no_data(e, tree)
    missing = [d["name"] for d in e.data_files if not d.get("license")]
    if missing:
        return UNMET, "no licence recorded for " + ", ".join(missing)
    return MET, "; ".join(f"{d['name']}: {d['license']}" for d in e.data_files)


def _data_curation(e: Entry, tree: LineageNode) -> tuple[str, str]:
    if _imported(e):
        return _upstream(e, "data curation")
    if not e.data_files:
        return _no_data(e, tree)
    keys = [k for k in ("data", "template", "max_seq_len", "packing", "filter") if k in e.recipe]
    if keys:
        return MET, "recipe records " + ", ".join(keys)
    return UNMET, "the recipe records no data processing (template, packing, filtering)"


def _compute_usage(e: Entry, _: LineageNode) -> tuple[str, str]:
    if _imported(e):
        return _upstream(e, "training compute")
    c = e.compute or {}
    if c.get("flops") or c.get("device_hours"):
        return MET, ", ".join(f"{k}: {c[k]}" for k in ("flops", "device_hours") if c.get(k))
    return UNMET, "no FLOPs or device-hours recorded (pass compute={'flops': ...})"


def _duration(e: Entry, _: LineageNode) -> tuple[str, str]:
    if _imported(e):
        return _upstream(e, "development duration")
    c = e.compute or {}
    if c.get("duration_s") is not None:
        return MET, f"{c['duration_s']} s ({e.started_at} to {e.created_at})"
    return UNMET, "no start time recorded (pass started_at=)"


def _hardware(e: Entry, _: LineageNode) -> tuple[str, str]:
    if _imported(e):
        return _upstream(e, "training hardware")
    hw = (e.compute or {}).get("hardware")
    return (MET, str(hw)) if hw else (UNMET, "no hardware recorded")


def _energy(key: str, unit: str) -> Check:
    def check(e: Entry, _: LineageNode) -> tuple[str, str]:
        if _imported(e):
            return _upstream(e, key.replace("_", " "))
        value = (e.compute or {}).get(key)
        return (MET, f"{value} {unit}") if value is not None else (UNMET, f"no {key} recorded")

    return check


def _stages(e: Entry, tree: LineageNode) -> tuple[str, str]:
    chain: list[str] = []
    node: LineageNode | None = tree
    while node is not None:
        chain.append(f"{node.operation} ({node.name})")
        node = node.parents[0] if node.parents else None
    text = " <- ".join(chain)
    if _imported(e):
        return UNKNOWN, f"stages before the import are upstream; recorded: {text}"
    return MET, f"every stage since import is recorded: {text}"


def _objectives(e: Entry, _: LineageNode) -> tuple[str, str]:
    if _imported(e):
        return _upstream(e, "the training objective")
    keys = [k for k in ("objective", "loss", "method", "scheme") if k in e.recipe]
    if keys:
        return MET, ", ".join(f"{k}: {e.recipe[k]}" for k in keys)
    return UNMET, "the recipe names no objective, loss or method"


def _frameworks(e: Entry, _: LineageNode) -> tuple[str, str]:
    env = e.environment
    parts = [f"folklm {env.get('folklm')}", f"python {env.get('python')}"]
    if env.get("torch"):
        parts.append(f"torch {env['torch']}")
    return MET, ", ".join(parts)


def _always(evidence: Callable[[Entry], str]) -> Check:
    return lambda e, _: (MET, evidence(e))


def _capabilities(e: Entry, _: LineageNode) -> tuple[str, str]:
    if e.description:
        return MET, e.description
    return UNMET, "no description of intended use recorded (pass description=)"


def _is_speed(r: dict[str, Any]) -> bool:
    return "per_s" in r["metric"] or "latency" in r["metric"]


def _evaluations(e: Entry, _: LineageNode) -> tuple[str, str]:
    rows = [r for r in e.evaluations if not _is_speed(r)]
    if not rows:
        return UNMET, "no evaluation results recorded (folklm.hub.api.add_evaluation)"
    return MET, "; ".join(f"{r['task']} {r['metric']} = {r['value']:.4g}" for r in rows)


def _reproducible(e: Entry, _: LineageNode) -> tuple[str, str]:
    rows = [r for r in e.evaluations if not _is_speed(r)]
    if not rows:
        return UNMET, "no evaluations"
    bad = [r["task"] for r in rows if not (r.get("dataset_sha256") and r.get("config"))]
    if bad:
        return UNMET, "no data hash or settings recorded for " + ", ".join(bad)
    return MET, "every evaluation records its data set hash and settings"


def _inference(e: Entry, _: LineageNode) -> tuple[str, str]:
    rows = [r for r in e.evaluations if _is_speed(r)]
    if not rows:
        return UNMET, "no inference speed measured"
    r = rows[0]
    hw = r["config"].get("hardware", "hardware not recorded")
    return MET, f"{r['task']} {r['metric']} = {r['value']:.4g} on {hw}"


def _licence(e: Entry, _: LineageNode) -> tuple[str, str]:
    lic = e.license.get("expression")
    if not lic:
        return UNMET, "licence unknown"
    return MET, f"{lic} ({e.license.get('source')})"


def _uses(e: Entry, _: LineageNode) -> tuple[str, str]:
    ids = split_expression(e.license.get("expression"))
    if not ids:
        return UNKNOWN, "licence unknown, so permitted uses are unknown"
    lics = [BY_ID.get(i) for i in ids]
    if any(lic is None for lic in lics):
        return UNKNOWN, "licence not in folklm's table: " + ", ".join(ids)
    parts = [
        "commercial use permitted" if e.license.get("commercial") else "non-commercial only",
        *(f"use policy: {lic.use_policy}" for lic in lics if lic and lic.use_policy),
    ]
    return MET, "; ".join(parts)


def _users(e: Entry, _: LineageNode) -> tuple[str, str]:
    lics = [BY_ID.get(i) for i in split_expression(e.license.get("expression"))]
    if not lics or any(lic is None for lic in lics):
        return UNKNOWN, "licence unknown"
    limits = [lic.user_limit for lic in lics if lic and lic.user_limit]
    return MET, "; ".join(limits) if limits else "anyone the licence reaches; no user limits"


def _changelog(e: Entry, tree: LineageNode) -> tuple[str, str]:
    if not tree.parents:
        return UNKNOWN, "imported: changes before import are upstream"
    return MET, f"{e.operation} of " + ", ".join(
        p["name"] for p in e.parents
    ) + " (recipe recorded)"


INDICATORS: tuple[tuple[str, str, str, Check], ...] = (
    ("Upstream", "Data", "Data size", _data_size),
    ("Upstream", "Data", "Data sources", _data_sources),
    ("Upstream", "Data", "Data curation", _data_curation),
    ("Upstream", "Data", "Data license", _data_license),
    ("Upstream", "Compute", "Compute usage", _compute_usage),
    ("Upstream", "Compute", "Development duration", _duration),
    ("Upstream", "Compute", "Compute hardware", _hardware),
    ("Upstream", "Compute", "Energy usage", _energy("energy_kwh", "kWh")),
    ("Upstream", "Compute", "Carbon emissions", _energy("co2_kg", "kg CO2eq")),
    ("Upstream", "Methods", "Model stages", _stages),
    ("Upstream", "Methods", "Model objectives", _objectives),
    ("Upstream", "Methods", "Core frameworks", _frameworks),
    ("Model", "Model basics", "Input modality", _always(lambda e: "text (causal language model)")),
    ("Model", "Model basics", "Output modality", _always(lambda e: "text")),
    (
        "Model",
        "Model basics",
        "Model components",
        _always(lambda e: ", ".join(f["path"] for f in e.files) or "files released"),
    ),
    (
        "Model",
        "Model basics",
        "Model size",
        _always(
            lambda e: (
                f"{e.parameters:,} parameters, {e.size:,} bytes"
                if e.parameters
                else f"{e.size:,} bytes"
            )
        ),
    ),
    (
        "Model",
        "Model basics",
        "Model architecture",
        _always(lambda e: f"{e.architecture} ({e.format}, {e.quantization})"),
    ),
    (
        "Model",
        "Model basics",
        "Centralized model documentation",
        _always(lambda e: f"model card: folk card {e.name}"),
    ),
    ("Model", "Capabilities", "Capabilities description", _capabilities),
    ("Model", "Capabilities", "Evaluation of capabilities", _evaluations),
    ("Model", "Capabilities", "External reproducibility of capabilities evaluation", _reproducible),
    ("Model", "Inference", "Inference duration evaluation", _inference),
    ("Downstream", "Distribution", "Model License", _licence),
    ("Downstream", "Usage policy", "Permitted and prohibited users", _users),
    ("Downstream", "Usage policy", "Permitted, restricted, and prohibited uses", _uses),
    (
        "Downstream",
        "Model Updates",
        "Versioning protocol",
        _always(lambda e: f"immutable entry {e.name}, content hash sha256:{e.digest[:12]}"),
    ),
    ("Downstream", "Model Updates", "Change log", _changelog),
)


@dataclass
class Report:
    model: str
    indicators: list[Indicator]

    @property
    def met(self) -> int:
        return sum(i.status == MET for i in self.indicators)

    @property
    def score(self) -> float:
        return self.met / len(self.indicators)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "index": "Foundation Model Transparency Index (Bommasani et al., 2023)",
            "met": self.met,
            "unmet": sum(i.status == UNMET for i in self.indicators),
            "unknown": sum(i.status == UNKNOWN for i in self.indicators),
            "total": len(self.indicators),
            "score": round(self.score, 4),
            "indicators": [asdict(i) for i in self.indicators],
        }


def report(entry: Entry, tree: LineageNode) -> Report:
    """Score ``entry`` (with its lineage ``tree``) on the indicators above."""
    items = []
    for domain, sub, name, check in INDICATORS:
        status, evidence = check(entry, tree)
        items.append(Indicator(domain, sub, name, status, evidence))
    return Report(entry.name, items)


def to_markdown(rep: Report) -> str:
    d = rep.to_dict()
    lines = [
        f"Scored against the {d['total']} indicators of the Foundation Model Transparency Index "
        "(Bommasani et al., 2023) that a derivative can satisfy from its own record: "
        f"**{d['met']}/{d['total']} met** ({d['unmet']} unmet, {d['unknown']} unknown "
        "because they concern the upstream developer).",
        "",
        "| domain | indicator | status | evidence |",
        "|---|---|---|---|",
    ]
    for i in rep.indicators:
        evidence = i.evidence.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {i.domain} / {i.subdomain} | {i.name} | {i.status} | {evidence} |")
    return "\n".join(lines)

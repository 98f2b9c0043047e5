"""Running tasks on a model: requests from records, scores, metrics with standard errors.

``evaluate(llm, specs)`` is what ``folk eval`` calls; it returns plain dicts (JSON-ready)
with per-task metrics, their standard errors, the item count and, on request, the per-item
scores (the agreement tests compare those with lm-evaluation-harness's).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from folklm.engine.llm import LLM
from folklm.errors import FolkError
from folklm.eval import metrics as M
from folklm.eval.data import load_records
from folklm.eval.progress import bar
from folklm.eval.scorer import Scorer
from folklm.eval.tasks import Filter, TaskSpec, check_uniform, fewshot_prefix

FEWSHOT_SEED = 1234  # the harness's default fewshot_random_seed


def build_requests(
    spec: TaskSpec,
    limit: int | None = None,
    shots: int | None = None,
    seed: int = FEWSHOT_SEED,
    chat_template: Callable[[str], str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(records, items): each item holds the strings to score for one record."""
    if limit is not None and limit < 1:
        raise FolkError(f"--limit must be >= 1, got {limit}")
    records = load_records(spec.data, spec.format, spec.preprocess)
    if limit is not None:
        records = records[:limit]
    k = spec.num_fewshot if shots is None else shots
    if k < 0:
        raise FolkError(f"--shots must be >= 0, got {k}")
    if k and spec.kind == "rolling":
        raise FolkError(f"task {spec.name}: a rolling (perplexity) task takes no shots")
    pool, same_split = records, True
    if k and spec.fewshot_data:
        pool = load_records(spec.fewshot_data, spec.format, spec.preprocess)
        same_split = False  # the harness passes no eval_doc: exactly k are drawn
    elif k and limit is not None:
        pool = load_records(spec.data, spec.format, spec.preprocess)
    rng = random.Random(seed)
    delim = spec.target_delimiter if chat_template is None else ""
    items: list[dict[str, Any]] = []
    texts: list[str] = []  # per record, for check_uniform
    all_options: list[list[str]] = []
    for n, doc in enumerate(records):
        where = f"{Path(spec.data).name} record {n}"
        if spec.kind == "rolling":
            text = spec.doc_text(doc, where)
            texts.append(text)
            count = doc.get("count_text", text)
            items.append(
                {"text": text, "words": M.count_words(count), "bytes": len(count.encode())}
            )
            continue
        exclude = doc if same_split else None
        prefix = fewshot_prefix(spec, k, pool, rng, exclude) if k or spec.description else ""

        def wrap(ctx: str) -> str:
            return chat_template(ctx) if chat_template else ctx

        if spec.kind == "multiple_choice":
            options = spec.doc_choices(doc, where)
            all_options.append(options)
            gold = spec.gold_index(doc, where)
            if spec.contexts is not None:
                cont = delim + str(spec.doc_target(doc, where))
                reqs = [(wrap(prefix + c), cont) for c in options]
                lengths = [len(cont)] * len(options)  # acc_norm divides by the choice text
            else:
                texts.append(spec.doc_text(doc, where))
                ctx = wrap(prefix + texts[-1])
                reqs = [(ctx, delim + o) for o in options]
                lengths = [len(o) for o in options]
            items.append({"requests": reqs, "gold": gold, "lengths": lengths})
        elif spec.kind == "loglikelihood":
            texts.append(spec.doc_text(doc, where))
            ctx = wrap(prefix + texts[-1])
            items.append({"requests": [(ctx, str(spec.doc_target(doc, where)))]})
        else:
            texts.append(spec.doc_text(doc, where))
            items.append(
                {
                    "context": wrap(prefix + texts[-1]),
                    "reference": str(spec.doc_target(doc, where)),
                }
            )
    check_uniform(spec, texts, all_options)
    return records, items


def prepare(
    specs: list[TaskSpec],
    limit: int | None = None,
    shots: int | None = None,
    seed: int = FEWSHOT_SEED,
    chat_template: Callable[[str], str] | None = None,
) -> list[tuple[TaskSpec, list[dict[str, Any]]]]:
    """Every task's items, built before any model is loaded (bad data fails fast)."""
    return [(s, build_requests(s, limit, shots, seed, chat_template)[1]) for s in specs]


def score_task(
    scorer: Scorer,
    spec: TaskSpec,
    items: list[dict[str, Any]],
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the model on a task's items; metrics, standard errors and per-item results."""
    if spec.kind == "rolling":
        lls = scorer.loglikelihood_rolling([it["text"] for it in items], progress)
        words, nbytes = [it["words"] for it in items], [it["bytes"] for it in items]
        values = {
            "word_perplexity": M.weighted_perplexity(lls, words),
            "byte_perplexity": M.weighted_perplexity(lls, nbytes),
            "bits_per_byte": M.bits_per_byte(lls, nbytes),
        }
        out: dict[str, tuple[float, float | None]] = {
            k: (v, None) for k, v in values.items() if k in spec.metrics
        }
        return {"metrics": out, "per_item": [{"ll": ll} for ll in lls]}
    if spec.kind == "generate":
        texts = scorer.generate(
            [it["context"] for it in items], spec.until, spec.max_gen_tokens, progress
        )
        out = {}
        per_item: list[dict[str, Any]] = [{"response": t} for t in texts]
        filters: Sequence[Filter | None] = spec.filters or [None]
        for f in filters:
            scores = []
            for it, rec, text in zip(items, per_item, texts, strict=True):
                answer = (
                    text
                    if f is None
                    else M.regex_extract(text, f.regex, f.group_select, f.fallback)
                )
                s = M.exact_match(answer, it["reference"], spec.regexes_to_ignore, spec.ignore_case)
                rec[f.name if f else "answer"] = answer
                scores.append(s)
            key = "exact_match" if f is None else f"exact_match,{f.name}"
            out[key] = (sum(scores) / len(scores), M.mean_stderr(scores))
        return {"metrics": out, "per_item": per_item}
    flat = [r for it in items for r in it["requests"]]
    results = scorer.loglikelihood(flat, progress)
    per_item, pos = [], 0
    for it in items:
        n = len(it["requests"])
        per_item.append(
            {
                "ll": [r[0] for r in results[pos : pos + n]],
                "greedy": [r[1] for r in results[pos : pos + n]],
            }
        )
        pos += n
    if spec.kind == "loglikelihood":
        lls = [p["ll"][0] for p in per_item]
        acc = [float(p["greedy"][0]) for p in per_item]
        out = {}
        if "perplexity" in spec.metrics:
            out["perplexity"] = (M.perplexity(lls), M.bootstrap_perplexity_stderr(lls))
        if "acc" in spec.metrics:
            out["acc"] = (sum(acc) / len(acc), M.mean_stderr(acc))
        return {"metrics": out, "per_item": per_item}
    acc, acc_norm = [], []
    for it, p in zip(items, per_item, strict=True):
        lls = p["ll"]
        pred = max(range(len(lls)), key=lambda j: lls[j])
        norm = [ll / n for ll, n in zip(lls, it["lengths"], strict=True)]
        pred_norm = max(range(len(norm)), key=lambda j: norm[j])
        acc.append(float(pred == it["gold"]))
        acc_norm.append(float(pred_norm == it["gold"]))
        p.update(gold=it["gold"], pred=pred, pred_norm=pred_norm)
    out = {"acc": (sum(acc) / len(acc), M.mean_stderr(acc))}
    if "acc_norm" in spec.metrics:
        out["acc_norm"] = (sum(acc_norm) / len(acc_norm), M.mean_stderr(acc_norm))
    return {"metrics": out, "per_item": per_item}


def _n_units(spec: TaskSpec, items: list[dict[str, Any]]) -> int:
    if spec.kind in ("multiple_choice", "loglikelihood"):
        return sum(len(it["requests"]) for it in items)
    return len(items)


def evaluate(
    llm: LLM,
    specs: list[TaskSpec],
    *,
    limit: int | None = None,
    shots: int | None = None,
    batch_size: int = 16,
    seed: int = FEWSHOT_SEED,
    chat: bool = False,
    max_length: int | None = None,
    keep_items: bool = False,
    progress: bool = False,
    prepared: list[tuple[TaskSpec, list[dict[str, Any]]]] | None = None,
) -> dict[str, Any]:
    """Evaluate ``llm`` on ``specs``: ``{"results": {task: {...}}, "groups": {...}}``.

    Every task's entry: ``metrics`` {name: value}, ``stderr`` {name: value or None}, ``n``
    (records scored), ``num_fewshot``, ``kind``, ``data`` and, with ``keep_items``, the
    per-item scores. ``prepared`` (from :func:`prepare`) skips building the requests again.
    """
    if not specs:
        raise FolkError("no tasks to evaluate")
    chat_template = None
    if chat:
        if llm.tokenizer.chat_template is None:
            raise FolkError(f"{llm.source}: the model has no chat template (drop --chat)")

        def chat_template(text: str) -> str:
            return llm.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True
            )

    scorer = Scorer(llm, batch_size=batch_size, max_length=max_length)
    if prepared is None:
        prepared = prepare(specs, limit, shots, seed, chat_template)
    results: dict[str, Any] = {}
    with bar(progress, sum(_n_units(s, it) for s, it in prepared)) as tick:
        for spec, items in prepared:
            scored = score_task(scorer, spec, items, tick)
            entry: dict[str, Any] = {
                "kind": spec.kind,
                "n": len(items),
                "num_fewshot": spec.num_fewshot if shots is None else shots,
                "data": spec.data,
                "split": spec.split,
                "metrics": {k: v for k, (v, _) in scored["metrics"].items()},
                "stderr": {k: s for k, (_, s) in scored["metrics"].items()},
            }
            if spec.group:
                entry["group"] = spec.group
            if keep_items:
                entry["items"] = scored["per_item"]
            results[spec.name] = entry
    return {"results": results, "groups": _groups(results)}


def _groups(results: dict[str, Any]) -> dict[str, Any]:
    by_group: dict[str, list[dict[str, Any]]] = {}
    for r in results.values():
        if r.get("group"):
            by_group.setdefault(r["group"], []).append(r)
    out = {}
    for name, members in by_group.items():
        sizes = [m["n"] for m in members]
        accs = [m["metrics"]["acc"] for m in members]
        errs = [m["stderr"]["acc"] for m in members]
        value = sum(a * n for a, n in zip(accs, sizes, strict=True)) / sum(sizes)
        stderr = None
        if all(e is not None for e in errs) and sum(sizes) > len(sizes):
            stderr = M.pooled_stderr(errs, sizes)
        out[name] = {
            "kind": "group",
            "n": sum(sizes),
            "subtasks": len(members),
            "metrics": {"acc": value},
            "stderr": {"acc": stderr},
        }
    return out

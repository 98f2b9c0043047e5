"""Agreement of ``folk eval`` with lm-evaluation-harness's Hugging Face backend, per item.

Each side builds its own requests and computes its own accuracies: folklm with ``folk
eval``'s code (``build_requests`` + ``score_task``: prefix-cached scorer, its acc and
acc_norm); the harness with its own ``ConfigurableTask`` built from the task YAML lm-eval
ships, over the same shipped records (``tests/eval/lmeval_tasks.py``), scored by
``HFLM.loglikelihood`` on the same weights (the default model's converted float32 folder,
loaded by transformers), its acc and acc_norm from the task's own ``process_results``.
The requests are checked equal string for string; per task it prints the largest
per-request log-likelihood difference, both accuracies and both scoring times. Both models
are loaded before any timer starts; the timers cover scoring only. Ends with one JSON line.

    PYTHONPATH=src python bench/agreement.py --limit 200 --tasks hellaswag,arc_easy,winogrande
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def harness_side(lm, case: str, limit: int) -> tuple[list, list, dict, float]:
    """The harness's requests, log-likelihoods, metrics (its own code) and scoring time."""
    sys.path.insert(0, str(ROOT / "tests" / "eval"))
    from lmeval_tasks import harness_task  # lm-eval's ConfigurableTask over our records

    task = harness_task(case)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    instances = sorted(task.instances, key=lambda i: (i.doc_id, i.idx))
    t0 = time.perf_counter()
    results = lm.loglikelihood(instances, disable_tqdm=True)
    seconds = time.perf_counter() - t0
    per_doc: dict[int, list] = {}
    docs = {}
    for inst, res in zip(instances, results, strict=True):
        per_doc.setdefault(inst.doc_id, []).append(res)
        docs[inst.doc_id] = inst.doc
    metrics: dict[str, list[float]] = {}
    for doc_id in sorted(per_doc):
        for k, v in task.process_results(docs[doc_id], per_doc[doc_id]).items():
            metrics.setdefault(k, []).append(float(v))
    means = {k: 100 * statistics.fmean(v) for k, v in metrics.items()}
    return [tuple(i.args) for i in instances], [ll for ll, _ in results], means, seconds


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="hellaswag,arc_easy,winogrande")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)

    from lm_eval.models.huggingface import HFLM

    import folklm
    from folklm.eval.builtin import resolve_tasks
    from folklm.eval.runner import build_requests, score_task
    from folklm.eval.scorer import Scorer
    from folklm.hub.defaults import default_model_folder

    folder = str(default_model_folder())
    # both models loaded before any timer
    llm = folklm.load(folder, dtype="float32")
    scorer = Scorer(llm, batch_size=args.batch_size)
    lm = HFLM(pretrained=folder, dtype="float32", batch_size=args.batch_size, device="cpu")
    report = {}
    for spec in resolve_tasks(args.tasks):
        _, items = build_requests(spec, limit=args.limit)
        reqs = [tuple(r) for it in items for r in it["requests"]]
        t0 = time.perf_counter()
        scored = score_task(scorer, spec, items)
        seconds_f = time.perf_counter() - t0
        ours = [ll for p in scored["per_item"] for ll in p["ll"]]
        their_reqs, theirs, their_metrics, seconds_h = harness_side(lm, spec.name, args.limit)
        same = sum(a == b for a, b in zip(reqs, their_reqs, strict=True))
        if same != len(reqs):
            raise SystemExit(f"{spec.name}: {len(reqs) - same} requests differ from lm-eval's")
        diff = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
        m = scored["metrics"]
        row = {
            "items": len(items),
            "requests": len(reqs),
            "max_abs_ll_diff": diff,
            "acc_folklm": 100 * m["acc"][0],
            "acc_lm_eval": their_metrics["acc"],
            "acc_norm_folklm": 100 * m["acc_norm"][0] if "acc_norm" in m else None,
            "acc_norm_lm_eval": their_metrics.get("acc_norm"),
            "seconds_folklm": round(seconds_f, 2),
            "seconds_lm_eval": round(seconds_h, 2),
        }
        report[spec.name] = row
        print(
            f"{spec.name:12s} items {len(items):4d}  max |Δll| {diff:.2e}  acc "
            f"{row['acc_folklm']:.2f} vs {row['acc_lm_eval']:.2f}  acc_norm "
            f"{row['acc_norm_folklm']} vs {row['acc_norm_lm_eval']}  scoring s "
            f"{seconds_f:.1f} vs {seconds_h:.1f}",
            file=sys.stderr,
        )

    def close(a, b) -> bool:
        return a is None or abs(a - b) <= 0.5

    ok = all(
        r["max_abs_ll_diff"] < 1e-3
        and close(r["acc_folklm"], r["acc_lm_eval"])
        and close(r["acc_norm_folklm"], r["acc_norm_lm_eval"])
        for r in report.values()
    )
    out = {"tasks": report, "agree": ok, "load_average": os.getloadavg()}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

"""Agreement of ``folk eval`` with lm-evaluation-harness's Hugging Face backend, per item.

Both score the SAME requests (folklm builds them from the shipped data in the harness's
prompt format): folklm's prefix-cached scorer on the default model, and the harness's
``HFLM.loglikelihood`` on the same weights (the default model's converted float32 folder,
loaded by transformers). Prints per task the largest per-request log-likelihood
difference and both accuracies; ends with one JSON line.

    PYTHONPATH=src python bench/agreement.py --limit 200 --tasks hellaswag,arc_easy,winogrande
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def hf_loglikelihood(folder: str, requests: list[tuple[str, str]], batch_size: int):
    """The harness's own scoring of (context, continuation) strings with its HF backend."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=folder, dtype="float32", batch_size=batch_size, device="cpu")
    instances = [
        Instance("loglikelihood", {}, req, i, ("agreement", i, 1)) for i, req in enumerate(requests)
    ]
    return lm.loglikelihood(instances, disable_tqdm=True)


def accuracy(items, lls_flat) -> tuple[float, float]:
    acc, acc_norm, pos = [], [], 0
    for it in items:
        lls = lls_flat[pos : pos + len(it["requests"])]
        pos += len(it["requests"])
        norm = [ll / n for ll, n in zip(lls, it["lengths"], strict=True)]
        acc.append(max(range(len(lls)), key=lls.__getitem__) == it["gold"])
        acc_norm.append(max(range(len(norm)), key=norm.__getitem__) == it["gold"])
    return 100 * sum(acc) / len(acc), 100 * sum(acc_norm) / len(acc_norm)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="hellaswag,arc_easy,winogrande")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)

    import folklm
    from folklm.eval.builtin import resolve_tasks
    from folklm.eval.runner import build_requests
    from folklm.eval.scorer import Scorer
    from folklm.hub.defaults import default_model_folder

    folder = str(default_model_folder())
    llm = folklm.load(folder, dtype="float32")
    scorer = Scorer(llm, batch_size=args.batch_size)
    report = {}
    for spec in resolve_tasks(args.tasks):
        _, items = build_requests(spec, limit=args.limit)
        reqs = [r for it in items for r in it["requests"]]
        t0 = time.perf_counter()
        ours = [ll for ll, _ in scorer.loglikelihood(reqs)]
        t1 = time.perf_counter()
        theirs = [ll for ll, _ in hf_loglikelihood(folder, reqs, args.batch_size)]
        t2 = time.perf_counter()
        diff = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
        acc_f, norm_f = accuracy(items, ours)
        acc_h, norm_h = accuracy(items, theirs)
        report[spec.name] = {
            "items": len(items),
            "requests": len(reqs),
            "max_abs_ll_diff": diff,
            "acc_folklm": acc_f,
            "acc_lm_eval": acc_h,
            "acc_norm_folklm": norm_f,
            "acc_norm_lm_eval": norm_h,
            "seconds_folklm": round(t1 - t0, 2),
            "seconds_lm_eval": round(t2 - t1, 2),
        }
        print(
            f"{spec.name:12s} items {len(items):4d}  max |Δll| {diff:.2e}  acc {acc_f:.2f} vs "
            f"{acc_h:.2f}  acc_norm {norm_f:.2f} vs {norm_h:.2f}",
            file=sys.stderr,
        )
    ok = all(
        r["max_abs_ll_diff"] < 1e-3
        and abs(r["acc_folklm"] - r["acc_lm_eval"]) <= 0.5
        and abs(r["acc_norm_folklm"] - r["acc_norm_lm_eval"]) <= 0.5
        for r in report.values()
    )
    out = {"tasks": report, "agree": ok}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

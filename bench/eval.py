"""Evaluation speed: folklm's scorer vs lm-evaluation-harness's Hugging Face backend.

Same task, same requests (built once from the shipped data), same model (the default model's
float32 folder: folklm loads it, transformers loads it for the harness's ``HFLM``), same
batch size, same process and threads. Items per second counts task records (a HellaSwag
item is 4 requests); model loading is timed apart. Each side runs ``--repeats`` times and
the fastest run counts. Ends with one JSON line.

    PYTHONPATH=src python bench/eval.py --task hellaswag --limit 40 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="hellaswag")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import folklm
    from folklm.eval.builtin import resolve_tasks
    from folklm.eval.runner import build_requests
    from folklm.eval.scorer import Scorer
    from folklm.hub.defaults import default_model_folder

    folder = str(default_model_folder())
    (spec,) = resolve_tasks(args.task)
    _, items = build_requests(spec, limit=args.limit)
    reqs = [r for it in items for r in it["requests"]]

    t0 = time.perf_counter()
    llm = folklm.load(folder, dtype="float32")
    load_folklm = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf = HFLM(pretrained=folder, dtype="float32", batch_size=args.batch_size, device="cpu")
    load_hf = time.perf_counter() - t0
    instances = [Instance("loglikelihood", {}, r, i, (spec.name, i, 1)) for i, r in enumerate(reqs)]
    scorer = Scorer(llm, batch_size=args.batch_size)

    def timed(fn) -> tuple[float, list[float]]:
        best, out = float("inf"), []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = [ll for ll, _ in fn()]
            best = min(best, time.perf_counter() - t)
        return best, out

    s_ours, ours = timed(lambda: scorer.loglikelihood(reqs))
    s_hf, theirs = timed(lambda: hf.loglikelihood(instances, disable_tqdm=True))
    diff = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    ips_ours, ips_hf = len(items) / s_ours, len(items) / s_hf
    print(
        f"{spec.name}: {len(items)} items, {len(reqs)} requests, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads\n"
        f"  folklm        {s_ours:8.2f} s  {ips_ours:7.2f} items/s  (load {load_folklm:.1f} s)\n"
        f"  lm-eval HFLM  {s_hf:8.2f} s  {ips_hf:7.2f} items/s  (load {load_hf:.1f} s)\n"
        f"  ratio {ips_ours / ips_hf:.2f}x   max |Δll| {diff:.1e}",
        file=sys.stderr,
    )
    out = {
        "task": spec.name,
        "items": len(items),
        "requests": len(reqs),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "folklm_items_per_s": round(ips_ours, 3),
        "lm_eval_hf_items_per_s": round(ips_hf, 3),
        "items_per_s_ratio_vs_lm_eval": round(ips_ours / ips_hf, 3),
        "max_abs_ll_diff": diff,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

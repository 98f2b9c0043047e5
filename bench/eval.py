"""Evaluation speed: folklm's scorer vs lm-evaluation-harness's Hugging Face backend.

Same task, same requests (built once from the shipped data), same model (the default model's
float32 folder: folklm loads it, transformers loads it for the harness's ``HFLM``), same
batch size, same process and threads. Items per second counts task records (a HellaSwag
item is 4 requests). Both models are loaded before any timer starts (load times are printed
apart); the timers cover scoring only. The two sides alternate for ``--repeats`` rounds
(folklm first in odd rounds, the harness first in even ones), so that a change in the
machine's load hits both; the fastest run of each counts, the median is printed too, and so
is the machine's load average. ``--profile`` adds a cProfile of one more folklm run (top
functions by cumulative time). Ends with one JSON line.

    PYTHONPATH=src python bench/eval.py --task hellaswag --limit 40 --batch-size 16 --repeats 3
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="hellaswag")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds per side")
    ap.add_argument("--profile", action="store_true", help="cProfile one more folklm run")
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

    load_before = os.getloadavg()
    runs: dict[str, list[float]] = {"folklm": [], "lm_eval": []}
    sides = {
        "folklm": lambda: [ll for ll, _ in scorer.loglikelihood(reqs)],
        "lm_eval": lambda: [ll for ll, _ in hf.loglikelihood(instances, disable_tqdm=True)],
    }
    outputs: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for side in ("folklm", "lm_eval") if r % 2 == 0 else ("lm_eval", "folklm"):
            t = time.perf_counter()
            outputs[side] = sides[side]()
            runs[side].append(time.perf_counter() - t)
    load_after = os.getloadavg()
    s_ours, s_hf = min(runs["folklm"]), min(runs["lm_eval"])
    ours, theirs = outputs["folklm"], outputs["lm_eval"]
    diff = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    ips_ours, ips_hf = len(items) / s_ours, len(items) / s_hf
    print(
        f"{spec.name}: {len(items)} items, {len(reqs)} requests, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads\n"
        f"  folklm        {s_ours:8.2f} s  {ips_ours:7.2f} items/s  (load {load_folklm:.1f} s)\n"
        f"  lm-eval HFLM  {s_hf:8.2f} s  {ips_hf:7.2f} items/s  (load {load_hf:.1f} s)\n"
        f"  ratio {ips_ours / ips_hf:.2f}x (medians: "
        f"{statistics.median(runs['lm_eval']) / statistics.median(runs['folklm']):.2f}x)   "
        f"max |Δll| {diff:.1e}\n"
        f"  {args.repeats} interleaved rounds; seconds per run: folklm "
        f"{[round(x, 2) for x in runs['folklm']]}, lm-eval {[round(x, 2) for x in runs['lm_eval']]}"
        f"\n  machine: {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.1f}' for x in load_before)} before, "
        f"{' '.join(f'{x:.1f}' for x in load_after)} after",
        file=sys.stderr,
    )
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(sides["folklm"])
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(25)
        print(text.getvalue(), file=sys.stderr)
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
        "rounds": args.repeats,
        "seconds_folklm": runs["folklm"],
        "seconds_lm_eval": runs["lm_eval"],
        "load_folklm_s": round(load_folklm, 2),
        "load_lm_eval_s": round(load_hf, 2),
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

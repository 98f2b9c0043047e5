"""Decode speed of this tree against a baseline git revision, on the same machine and clock.

The baseline is checked out as a ``git worktree`` in a temporary folder; every round runs
the same workloads once with each tree, in fresh subprocesses (``PYTHONPATH=<tree>/src``),
alternating which goes first, so that drift in the machine's load hits both sides alike:

- decode: the bundled SmolLM2-135M (``folklm.load()``), a 128-token prompt, 128 new tokens,
  greedy, batch 1; float32, and bfloat16 where the CPU has avx512_bf16 or AMX;
- server: 8 concurrent requests through the continuous-batching ``Engine`` (no HTTP).

The model is loaded outside the timers. Prints the CPU, its relevant flags, the load
average, a table of medians, and a final JSON line with the ratios new/old (above 1: the
new tree is faster).

    python bench/compare_revisions.py [--base REV] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_info() -> tuple[str, list[str]]:
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, [f for f in FLAGS if f in flags]


def prompt_ids(tokenizer, n: int) -> list[int]:
    text = (
        "The history of the printing press begins in the fifteenth century, when movable "
        "type changed how books were made, sold and read across Europe. "
    )
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(text)
    return ids[:n]


# -- worker: runs inside the tree under test ------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    import threading

    import torch

    torch.set_num_threads(args.threads)

    import folklm
    from folklm.engine.generate import Timings, generate
    from folklm.engine.scheduler import Engine, Request
    from folklm.ops.sampling import SamplingParams

    out: dict[str, object] = {"folklm": folklm.__file__}
    for dtype in args.dtypes.split(","):
        llm = folklm.load(dtype=dtype)
        ids = prompt_ids(llm.tokenizer, args.prompt)
        params = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
        warm = SamplingParams(max_new_tokens=4, ignore_eos=True)
        generate(llm.model, llm.tokenizer, [ids], warm, llm.eos_token_ids)
        timings = Timings()
        t0 = time.perf_counter()
        generate(llm.model, llm.tokenizer, [ids], params, llm.eos_token_ids, timings)
        wall = time.perf_counter() - t0
        out[f"decode_{dtype}_tps"] = timings.decode_tps
        out[f"prefill_{dtype}_ms"] = 1000 * timings.prefill_seconds
        out[f"total_{dtype}_s"] = wall

    llm = folklm.load(dtype="float32")
    engine = Engine(llm, max_batch=args.requests)
    try:
        base = prompt_ids(llm.tokenizer, 64)
        prompts = [base[i:] + base[:i] for i in range(args.requests)]  # no shared prefixes
        done = threading.Semaphore(0)
        tokens = [0]

        def sink(event: dict) -> None:
            if event["type"] == "token":
                tokens[0] += 1
            elif event["type"] == "finish":
                assert event["finish_reason"] != "error", event
                done.release()

        def run(n_tokens: int) -> float:
            t0 = time.perf_counter()
            for p in prompts:
                engine.submit(Request(p, n_tokens, sink, temperature=0, ignore_eos=True, stop=[]))
            for _ in prompts:
                assert done.acquire(timeout=600)
            return time.perf_counter() - t0

        run(2)  # warm-up
        tokens[0] = 0
        wall = run(args.server_new)
        out["server_tps"] = tokens[0] / wall
    finally:
        engine.shutdown()
    print(json.dumps(out))


# -- driver -------------------------------------------------------------------------------
def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def default_base() -> str:
    """The merge base with main on a branch; on main itself (where that is HEAD) the tree
    before the issue-12 redesign, abf5e2f. Pass --base to compare against anything else."""
    head = git("rev-parse", "HEAD")
    try:
        base = git("merge-base", "HEAD", "main")
    except subprocess.CalledProcessError:
        base = head
    return "abf5e2f" if base == head else base


def run_side(tree: Path, args: argparse.Namespace, dtypes: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--dtypes",
        ",".join(dtypes),
        "--prompt",
        str(args.prompt),
        "--new",
        str(args.new),
        "--requests",
        str(args.requests),
        "--server-new",
        str(args.server_new),
        "--threads",
        str(args.threads),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    if res.returncode != 0:
        raise SystemExit(f"worker in {tree} failed:\n{res.stderr[-3000:]}")
    data = json.loads(res.stdout.strip().splitlines()[-1])
    if not str(data["folklm"]).startswith(str(tree)):
        raise SystemExit(f"worker imported {data['folklm']}, not the tree {tree}")
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="baseline revision (default: merge base)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--server-new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dtypes", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    model, flags = cpu_info()
    dtypes = ["float32"]
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        dtypes.append("bfloat16")
    base = args.base or default_base()
    print(f"cpu: {model}; {os.cpu_count()} logical cores; flags: {' '.join(flags) or '-'}")
    print(f"torch threads per run: {args.threads}")
    print(f"baseline {base} ({git('rev-parse', '--short', base)}) vs this tree ({ROOT})")
    load_before = os.getloadavg()
    print("load average before: " + " ".join(f"{x:.2f}" for x in load_before))
    samples: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    with tempfile.TemporaryDirectory(prefix="folk-base-") as tmp:
        old_tree = Path(tmp) / "base"
        git("worktree", "add", "--detach", str(old_tree), base)
        try:
            for r in range(args.rounds):
                order = [("old", old_tree), ("new", ROOT)]
                if r % 2:
                    order.reverse()
                for side, tree in order:
                    data = run_side(tree, args, dtypes)
                    for key, value in data.items():
                        if key != "folklm":
                            samples[side].setdefault(key, []).append(float(value))
                print(f"round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.2f}")
        finally:
            git("worktree", "remove", "--force", str(old_tree))
    load_after = os.getloadavg()
    print("load average after: " + " ".join(f"{x:.2f}" for x in load_after))

    head = f"metric (median of {args.rounds})"
    print(f"\n{head:<28}{'old':>12}{'new':>12}{'new/old':>10}")
    ratios = {}
    for key in samples["new"]:
        old = statistics.median(samples["old"][key])
        new = statistics.median(samples["new"][key])
        ratios[key] = new / old if old else float("nan")
        print(f"{key:<28}{old:>12.2f}{new:>12.2f}{ratios[key]:>10.3f}")
    print(
        json.dumps(
            {
                "base": base,
                "rounds": args.rounds,
                "cpu": model,
                "flags": flags,
                "load_before": load_before,
                "load_after": load_after,
                "ratios_new_over_old": {k: round(v, 4) for k, v in ratios.items()},
            }
        )
    )


if __name__ == "__main__":
    main()

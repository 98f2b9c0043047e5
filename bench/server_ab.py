"""The server engine alone, one tree per process: 8 concurrent requests x 32 greedy tokens.

Run it with each tree's ``src`` on PYTHONPATH, alternating the trees, to compare two
revisions of ``engine.scheduler.Engine`` without anything else in the process::

    git worktree add ../folklm-old abf5e2f
    for i in 1 2; do
      (cd ../folklm-old && PYTHONPATH=src python "$OLDPWD/bench/server_ab.py" old)
      PYTHONPATH=src python bench/server_ab.py new
    done

Each line: the label, then per round (tok/s, wall s, seconds in decode steps, decode steps).
"""

from __future__ import annotations

import sys
import threading
import time

import torch

import folklm
import folklm.engine.scheduler as scheduler

torch.set_num_threads(1)
spent = {"decode": 0.0, "steps": 0}
_step = scheduler.Engine._decode_step


def _timed_step(self) -> None:
    t = time.perf_counter()
    _step(self)
    spent["decode"] += time.perf_counter() - t
    spent["steps"] += 1


scheduler.Engine._decode_step = _timed_step  # type: ignore[method-assign]


def main() -> None:
    llm = folklm.load(dtype="float32")
    engine = scheduler.Engine(llm, max_batch=8)
    base = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 12)[:64]
    prompts = [base[i:] + base[:i] for i in range(8)]  # no shared prefixes
    done = threading.Semaphore(0)

    def sink(event: dict) -> None:
        if event["type"] == "finish":
            done.release()

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for p in prompts:
            engine.submit(scheduler.Request(p, n, sink, temperature=0, ignore_eos=True, stop=[]))
        for _ in prompts:
            done.acquire()
        return time.perf_counter() - t0

    try:
        run(2)  # warm-up
        rounds = []
        for _ in range(3):
            spent.update(decode=0.0, steps=0)
            wall = run(32)
            rounds.append((round(8 * 32 / wall, 1), round(wall, 2), round(spent["decode"], 2)))
            rounds[-1] += (spent["steps"],)
        print(sys.argv[1] if len(sys.argv) > 1 else "tree", rounds)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()

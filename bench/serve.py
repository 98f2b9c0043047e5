"""Serving throughput and latency: 1, 4, 16 and 64 concurrent streaming clients on loopback.

Starts ``folk serve`` (the bundled SmolLM2-135M-Instruct unless ``--model``) as its own
process, so its RSS is the server's alone, and drives it with asyncio ``httpx`` clients
that each send streaming chat requests back to back for ``--duration`` seconds (requests
in flight at the end are let finish; the rate uses the whole wall time). Per level:
aggregate completion tokens/s (exact counts from ``stream_options.include_usage``),
p50/p99 time to first token and inter-token latency (gaps between content chunks), peak
server RSS during the level and RSS after it once the server is idle again, against the
idle baseline measured after a warm-up. The peer run side by side is the same server with
``--max-batch 1`` (requests served one after another) at 16 clients.

Both servers are up for the whole run and the measurements are interleaved: ``--rounds``
rounds, each running every level (in reverse order every other round) and, at 16 clients,
the batched and the one-at-a-time server back to back (alternating which goes first), so
that a change in the machine's load hits all of them. Each figure is the median over the
rounds (the per-round tokens/s are printed too), and the machine's load average is printed
with the figures.

    python bench/serve.py                       # table + one JSON line at the end
    python bench/serve.py --duration 30 --levels 1 4 16 64 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Tell me about the history of bread.",
    "Explain how a bicycle works.",
    "Write a short poem about the sea.",
    "What should I pack for a hiking trip?",
    "Describe the water cycle.",
    "Give me three tips for learning a language.",
    "Why is the sky blue?",
    "Summarise the plot of a fairy tale you like.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str | None, max_batch: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "folklm.cli.main", "serve", "--port", str(self.port),
               "--max-batch", str(max_batch), "--max-queue", "1024"]  # fmt: skip
        if model:
            cmd.insert(4, model)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit("folk serve did not start")
            time.sleep(0.2)
        self.ps = psutil.Process(self.proc.pid)
        self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def idle_rss_mb(self, settle: float = 3.0) -> float:
        """RSS once the engine has gone idle (it releases its cache then)."""
        deadline = time.time() + 60
        while time.time() < deadline:
            m = httpx.get(self.url + "/metrics").text
            if f'folk_running_sequences{{model="{self.model}"}} 0' in m:
                break
            time.sleep(0.2)
        time.sleep(settle)
        return self.rss_mb()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


async def client(url, model, stop_at, max_tokens, rng, out) -> None:
    async with httpx.AsyncClient(timeout=600) as c:
        while time.perf_counter() < stop_at:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
                "max_tokens": max_tokens,
                "temperature": 0.8,
                "seed": rng.randrange(1 << 30),
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            t0 = time.perf_counter()
            last, ttft, gaps, tokens = None, None, [], 0
            async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    data = json.loads(line[6:])
                    if data.get("usage"):
                        tokens = data["usage"]["completion_tokens"]
                    if data["choices"] and data["choices"][0]["delta"].get("content"):
                        now = time.perf_counter()
                        if ttft is None:
                            ttft = now - t0
                        else:
                            gaps.append(now - last)
                        last = now
            out.append({"ttft": ttft, "gaps": gaps, "tokens": tokens})


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_level(server: Server, n: int, duration: float, max_tokens: int) -> dict:
    out: list[dict] = []
    peak = [server.rss_mb()]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], server.rss_mb())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    async def main():
        stop_at = time.perf_counter() + duration
        rngs = [random.Random(1000 * n + i) for i in range(n)]
        await asyncio.gather(
            *(client(server.url, server.model, stop_at, max_tokens, rngs[i], out) for i in range(n))
        )

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    tokens = sum(r["tokens"] for r in out)
    ttft = [r["ttft"] for r in out if r["ttft"] is not None]
    gaps = [g for r in out for g in r["gaps"]]
    return {
        "clients": n,
        "requests": len(out),
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(pct(ttft, 0.5), 4),
        "ttft_p99_s": round(pct(ttft, 0.99), 4),
        "itl_p50_s": round(pct(gaps, 0.5), 4),
        "itl_p99_s": round(pct(gaps, 0.99), 4),
        "peak_rss_mb": round(peak[0], 1),
        "after_load_rss_mb": round(server.idle_rss_mb(), 1),
    }


def merge(rounds: list[dict]) -> dict:
    """One level's figures over the rounds: the median of each number, the max of peak RSS,
    and the per-round tokens/s."""
    out = dict(rounds[0])
    for key, value in rounds[0].items():
        if key != "clients" and isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in rounds]
            out[key] = max(values) if key == "peak_rss_mb" else round(statistics.median(values), 4)
    out["tokens_per_s_rounds"] = [r["tokens_per_s"] for r in rounds]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model to serve (default: the bundled one)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-peer", action="store_true", help="skip the --max-batch 1 peer run")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median)")
    args = ap.parse_args()

    want_peer = not args.no_peer and 16 in args.levels
    server = Server(args.model, max_batch=max(args.levels))
    unbatched = Server(args.model, max_batch=1) if want_peer else None
    load_before = os.getloadavg()
    samples: dict[object, list[dict]] = {}
    try:
        run_level(server, 1, 2.0, 8)  # warm-up: first-request costs (vocabulary, caches)
        if unbatched is not None:
            run_level(unbatched, 1, 2.0, 8)
        idle = server.idle_rss_mb()
        for r in range(args.rounds):
            for n in args.levels if r % 2 == 0 else list(reversed(args.levels)):
                jobs: list[tuple[object, Server]] = [(n, server)]
                if unbatched is not None and n == 16:
                    jobs.append(("peer", unbatched))
                    if r % 2:
                        jobs.reverse()
                for key, srv in jobs:
                    result = run_level(srv, n, args.duration, args.max_tokens)
                    samples.setdefault(key, []).append(result)
    finally:
        server.stop()
        if unbatched is not None:
            unbatched.stop()
    load_after = os.getloadavg()
    levels = [merge(samples[n]) for n in args.levels]
    peer = merge(samples["peer"]) if "peer" in samples else None
    print(f"machine: {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in load_before)} before, "
          f"{' '.join(f'{x:.1f}' for x in load_after)} after; "
          f"{args.rounds} interleaved rounds")  # fmt: skip
    by = {lv["clients"]: lv for lv in levels}
    print(f"folk serve, {args.duration:.0f} s per level, max_tokens {args.max_tokens}; "
          f"idle RSS {idle:.0f} MB (after warm-up)")  # fmt: skip
    head = ("clients", "req", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "peak MB",
            "after MB")  # fmt: skip
    print("  ".join(f"{h:>9}" for h in head))
    rows = [*levels, *([{**peer, "clients": "16 (b=1)"}] if peer else [])]
    for lv in rows:
        cells = (lv["clients"], lv["requests"], lv["tokens_per_s"], lv["ttft_p50_s"],
                 lv["ttft_p99_s"], lv["itl_p50_s"], lv["itl_p99_s"], lv["peak_rss_mb"],
                 lv["after_load_rss_mb"])  # fmt: skip
        print("  ".join(f"{c:>9}" for c in cells))
    result = {
        "benchmark": "serve",
        "model": args.model or "smollm2-135m-instruct (bundled)",
        "duration_s": args.duration,
        "max_tokens": args.max_tokens,
        "idle_rss_mb": round(idle, 1),
        "rounds": args.rounds,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "levels": {str(k): v for k, v in by.items()},
    }
    if 1 in by and 16 in by and by[1]["tokens_per_s"]:
        result["scaling_16_vs_1"] = round(by[16]["tokens_per_s"] / by[1]["tokens_per_s"], 2)
        print(f"scaling 16 vs 1 client: {result['scaling_16_vs_1']}x (target >= 5x)")
    if peer:
        result["peer_max_batch_1_at_16"] = peer
        result["batched_vs_unbatched_at_16"] = round(
            by[16]["tokens_per_s"] / max(peer["tokens_per_s"], 1e-9), 2
        )
        print(f"continuous batching vs one-at-a-time, 16 clients: "
              f"{result['batched_vs_unbatched_at_16']}x")  # fmt: skip
    last = max(lv["after_load_rss_mb"] for lv in levels)
    result["rss_back_to_idle"] = bool(last <= idle * 1.1 + 50)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

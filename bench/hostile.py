"""A normal client's latency while a hostile client sends the worst request of each kind.

Serves the bundled model (SmolLM2-135M-Instruct) on 127.0.0.1 with an API key, then runs
a normal client -- greedy streamed chat completions of ``--tokens`` tokens, one after the
other -- first on a quiet server (the baseline), then while one hostile client repeats
each attack of issue 16 (``tests/serve/test_hostile.py`` checks the same findings for
correctness). For each: p50 and p99 of the normal request's latency and their ratio to
the baseline, the slowest ``/health`` answer, and the status codes the attacker got.

    PYTHONPATH=src python bench/hostile.py --requests 20   # --json: one JSON line per row

A shared machine makes the absolute figures noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable

import httpx
import uvicorn

import folklm
from folklm.serve.app import ServeConfig, build_app

KEY = "sk-bench"
AUTH = {"Authorization": f"Bearer {KEY}"}


def nested(depth: int) -> dict:
    s: dict = {"type": "string"}
    for _ in range(depth):
        s = {"type": ["object", "null", "string", "integer"], "properties": {"a": s}}
    return s


def chat_body(fmt: dict | None = None, **kw) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 16}
    if fmt is not None:
        body["response_format"] = fmt
    return {**body, **kw}


def schema(s) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}


def attacks(url: str) -> dict[str, Callable[[httpx.Client, int], int]]:
    """Attack name -> one attempt (client, attempt number) -> HTTP status."""
    chat = url + "/v1/chat/completions"

    def post(c: httpx.Client, path: str, body: dict, timeout: float = 120) -> int:
        try:
            return c.post(path, json=body, headers=AUTH, timeout=timeout).status_code
        except httpx.ReadTimeout:
            return 0  # the attacker hung up (the disconnect attack)

    enum = [f"value-{i:05d}" for i in range(2500)]
    return {
        "nested type lists x30": lambda c, i: post(c, chat, chat_body(schema(nested(30)))),
        "deeper than the limit": lambda c, i: post(c, chat, chat_body(schema(nested(40)))),
        "self-referencing $ref": lambda c, i: post(
            c, chat, chat_body(schema({"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}))
        ),
        "enum of 2,500 (33 KB)": lambda c, i: post(c, chat, chat_body(schema({"enum": enum}))),
        "a new schema each time": lambda c, i: post(
            c, chat, chat_body(schema({"enum": [f"{i}-{k}" for k in range(300)]}), max_tokens=2)
        ),
        "disconnect, non-stream": lambda c, i: post(
            c,
            chat,
            chat_body({"type": "regex", "regex": "[a-z]{2000}"}, max_tokens=1000, n=8),
            timeout=0.3,
        ),
        "16 prompts x n=16": lambda c, i: post(
            c, url + "/v1/completions", {"model": "m", "prompt": ["a"] * 16, "n": 16}
        ),
        "embeddings 8 x 500": lambda c, i: post(
            c, url + "/v1/embeddings", {"model": "m", "input": [[100 + k] * 500 for k in range(8)]}
        ),
        "rebinding Host header": lambda c, i: (
            c.get(url + "/v1/models", headers={**AUTH, "Host": "evil.example"}).status_code
        ),
        "openapi without a key": lambda c, i: c.get(url + "/openapi.json").status_code,
    }


def normal_requests(url: str, n: int, tokens: int) -> list[float]:
    out = []
    body = chat_body(max_tokens=tokens, temperature=0, stream=True)
    with httpx.Client(timeout=300) as c:
        for _ in range(n):
            t = time.perf_counter()
            with c.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH) as r:
                for _ in r.iter_lines():
                    pass
            out.append(time.perf_counter() - t)
    return out


def measure(url: str, n: int, tokens: int, attack=None) -> dict:
    stop = threading.Event()
    codes: Counter = Counter()
    health: list[float] = []

    def hostile():
        with httpx.Client() as c:
            i = 0
            while not stop.is_set():
                codes[attack(c, i)] += 1
                i += 1

    def poll():
        with httpx.Client() as c:
            while not stop.is_set():
                t = time.perf_counter()
                c.get(url + "/health", timeout=60)
                health.append(time.perf_counter() - t)
                time.sleep(0.1)

    threads = [threading.Thread(target=poll)]
    if attack is not None:
        threads.append(threading.Thread(target=hostile))
    for t in threads:
        t.start()
    try:
        lat = sorted(normal_requests(url, n, tokens))
    finally:
        stop.set()
        for t in threads:
            t.join()
    p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
    return {
        "p50_s": statistics.median(lat),
        "p99_s": p99,
        "health_max_s": max(health, default=0.0),
        "attacker_codes": dict(codes),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20, help="normal requests per phase")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per normal request")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--only", default="", help="run only the attacks whose name has this text")
    args = ap.parse_args()
    llm = folklm.load(dtype="float32")
    app = build_app(ServeConfig(models=[llm], names=["m"], api_keys=[KEY]))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    while not server.started:
        time.sleep(0.05)
    header = f"{'attack':<24} {'p50 s':>7} {'p99 s':>7} {'x p50':>6} {'x p99':>6} {'health':>7}"
    try:
        normal_requests(url, 2, args.tokens)  # warm-up
        quiet = measure(url, args.requests, args.tokens)
        if not args.json:
            print(header + "  attacker's codes", flush=True)
        chosen = [(k, a) for k, a in attacks(url).items() if args.only in k]
        for name, attack in [("quiet", None), *chosen]:
            r = quiet if attack is None else measure(url, args.requests, args.tokens, attack)
            r["p50_ratio"] = r["p50_s"] / quiet["p50_s"]
            r["p99_ratio"] = r["p99_s"] / quiet["p99_s"]
            if args.json:
                print(json.dumps({"attack": name, **r}), flush=True)
            else:
                print(
                    f"{name:<24} {r['p50_s']:7.3f} {r['p99_s']:7.3f} {r['p50_ratio']:6.2f} "
                    f"{r['p99_ratio']:6.2f} {r['health_max_s']:7.3f}  {r['attacker_codes']}",
                    flush=True,
                )
    finally:
        server.should_exit = True
        thread.join()


if __name__ == "__main__":
    main()

"""Issue 16 replayed against a real server: each finding of the 2026-11-29 review is sent
while a victim client streams the same greedy completion again and again.

Throughout, the victim gets exactly the tokens it gets alone, ``/health`` answers within
1 s (a liveness bound, not a timing benchmark), the attacker gets a 4xx where the request
is wrong or over a limit (and a normal answer where the request is legal and now cheap:
deep type lists, a large enum), and the server process grows by less than RSS_BOUND.
The hub findings (symlinks, loops, modes) are in ``tests/hub/test_import_hostile.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from serverutil import LiveServer

from folklm.engine.embed import embed
from folklm.serve.app import ServeConfig, build_app

KEY = "sk-hostile"
AUTH = {"Authorization": f"Bearer {KEY}"}
RSS_BOUND = 600 << 20  # growth of the server process over the whole module
VICTIM = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}


@pytest.fixture(scope="module")
def server(bpe_models, tmp_path_factory):
    folder = bpe_models("llama")
    broken = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(folder, broken)
    cfg_path = broken / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{{ messages[0]['content'] }}{{ 1 / 0 }}"
    cfg_path.write_text(json.dumps(cfg))
    config = ServeConfig(
        models=[str(folder), str(broken)],
        names=["tiny", "broken"],
        api_keys=[KEY],
        max_batch=32,
        max_queue=128,
        max_len=256,
        max_body_bytes=1 << 20,
    )
    with LiveServer(build_app(config)) as live:
        live.rss0 = psutil.Process().memory_info().rss
        yield live
        grown = psutil.Process().memory_info().rss - live.rss0
        assert grown < RSS_BOUND, f"the server grew by {grown >> 20} MB"


def stream_text(url: str, body: dict) -> str:
    text = ""
    with httpx.stream(
        "POST", url + "/v1/completions", headers=AUTH, json={**body, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                data = json.loads(line[6:])
                assert "error" not in data, data
                text += data["choices"][0]["text"]
    return text


class Victim:
    """Streams VICTIM in a loop and polls /health, until stopped."""

    def __init__(self, url: str, reference: str):
        self.url, self.reference = url, reference
        self.texts: list[str] = []
        self.health: list[float] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._stream), threading.Thread(target=self._poll)]

    def _stream(self) -> None:
        while not self.stop.is_set():
            self.texts.append(stream_text(self.url, VICTIM))

    def _poll(self) -> None:
        while not self.stop.is_set():
            t = time.perf_counter()
            r = httpx.get(self.url + "/health", timeout=10)
            self.health.append(time.perf_counter() - t)
            assert r.status_code == 200
            time.sleep(0.05)

    def __enter__(self) -> Victim:
        for t in self.threads:
            t.start()
        while not self.texts and not self.health:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        n = len(self.texts)
        deadline = time.time() + 60
        while len(self.texts) == n and time.time() < deadline:  # one whole run after
            time.sleep(0.02)
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
        assert self.texts and all(t == self.reference for t in self.texts), self.texts
        assert max(self.health) < 1.0, f"/health took {max(self.health):.2f} s"


@pytest.fixture
def victim(server):
    reference = stream_text(server.url, VICTIM)  # alone
    with Victim(server.url, reference) as v:
        yield v
    server.wait_idle()


def chat(server, fmt=None, model="tiny", **kw) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    if fmt is not None:
        body["response_format"] = fmt
    return httpx.post(
        server.url + "/v1/chat/completions", headers=AUTH, json={**body, **kw}, timeout=120
    )


def schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def nested_type_lists(depth: int) -> dict:
    s: dict = {"type": "string"}
    for _ in range(depth):
        s = {"type": ["object", "null", "string", "integer"], "properties": {"a": s}}
    return s


def test_1_exponential_schema(server, victim):
    """20 levels stalled /health 10 s, 30 would run for hours: now compiled in time (the
    answer parses), and deeper than the limit is a 400 naming it."""
    for depth in (20, 30):
        fmt = schema_format(nested_type_lists(depth))
        r = chat(server, fmt, max_tokens=30)
        assert r.status_code == 200, r.text
    r = chat(server, schema_format(nested_type_lists(40)))
    assert r.status_code == 400 and "the limit is 64 levels" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "schema, message",
    [
        ({"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}, "admits no value"),
        ({"$ref": 5}, "$ref must be a string"),
        ({"$ref": "file:///etc/passwd"}, "does not fetch"),
    ],
)
def test_2_bad_refs_are_400_and_the_batch_lives(server, victim, schema, message):
    r = chat(server, schema_format(schema))
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_3_large_enum_and_anyof(server, victim):
    """A 33 KB enum froze a stream for 7.8 s; now a normal request (the answer is one of
    the values when it finishes)."""
    values = [f"value-{i:05d}" for i in range(2500)]
    r = chat(server, schema_format({"enum": values}), max_tokens=12)
    assert r.status_code == 200
    if r.json()["choices"][0]["finish_reason"] == "stop":
        assert json.loads(r.json()["choices"][0]["message"]["content"]) in values
    anyof = {"anyOf": [{"const": v} for v in values[:1500]]}
    assert chat(server, schema_format(anyof), max_tokens=12).status_code == 200


def test_4_many_schemas_stay_within_the_cache_budget(server, victim):
    """Up to 13 GB of memoised masks before; now no mask is kept and compiled grammars are
    evicted beyond the byte budget (shrunk here to 1 MB so that 30 schemas overflow it)."""
    cache = server.engine("tiny").grammars()
    cache.budget_bytes = 1 << 20
    for i in range(30):
        r = chat(server, schema_format({"enum": [f"{i}-{k}" for k in range(200)]}), max_tokens=2)
        assert r.status_code == 200
    assert cache.nbytes <= cache.budget_bytes and len(cache) < 30


def test_5_non_streaming_disconnect_cancels_and_choices_are_capped(server, victim):
    engine = server.engine("tiny")
    before = engine.stats["requests_cancelled_total"]
    # a regex that forbids EOS for 300 letters: the request would run its whole budget
    fmt = {"type": "regex", "regex": "[a-z]{300}"}
    r = None
    with pytest.raises(httpx.ReadTimeout):
        r = httpx.post(
            server.url + "/v1/chat/completions",
            headers=AUTH,
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 230,
                "n": 8,
                "response_format": fmt,
            },
            timeout=0.5,
        )
    assert r is None
    deadline = time.time() + 30
    while engine.stats["requests_cancelled_total"] < before + 8 and time.time() < deadline:
        time.sleep(0.05)
    assert engine.stats["requests_cancelled_total"] >= before + 8  # none ran to its end
    body = {"model": "tiny", "prompt": ["a"] * 16, "n": 16, "max_tokens": 1}
    r = httpx.post(server.url + "/v1/completions", headers=AUTH, json=body, timeout=60)
    assert r.status_code == 400 and "the limit is 64 per request" in r.json()["error"]["message"]


def test_6_embeddings_share_the_engine(server, victim):
    """8 x 500 tokens froze a stream for 21 s; now chunks of 64 tokens, one per decode
    step (this model's context is 256 tokens: 16 x 250)."""
    inputs = [[5 + (i + k) % 300 for k in range(250)] for i in range(16)]
    r = httpx.post(
        server.url + "/v1/embeddings",
        headers=AUTH,
        json={"model": "tiny", "input": inputs},
        timeout=300,
    )
    assert r.status_code == 200 and len(r.json()["data"]) == 16
    one_pass = embed(server.engine("tiny").model, inputs[3])  # chunks give the same vector
    got = torch.tensor(r.json()["data"][3]["embedding"])
    torch.testing.assert_close(got, one_pass, atol=2e-6, rtol=1e-5)


def test_8_host_header_is_checked_on_loopback(server, victim):
    for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example"):
        r = httpx.get(server.url + "/health", headers={"Host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "[::1]"):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200


def test_9_keys_on_every_route_but_health(server, victim):
    for path in ("/metrics", "/openapi.json", "/v1/models", "/docs", "/nowhere"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401, path
    for path in ("/metrics", "/openapi.json", "/v1/models"):
        assert httpx.get(server.url + path, headers=AUTH).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/").status_code == 200  # the web chat page: no data


def test_10_error_bodies_carry_no_paths_or_exception_types(server, victim, bpe_models):
    r = chat(server, model="broken")
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "division by zero" in message and "<path>" in message
    assert "ZeroDivisionError" not in message and "/tmp" not in message and "/" not in message
    assert str(bpe_models("llama").parent.parent) not in r.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a `folk serve` process: about 15 s to start on a loaded machine
def test_12_api_key_from_the_environment_not_argv(bpe_models):
    port = _free_port()
    env = {**os.environ, "FOLK_API_KEY": "sk-from-env", "PYTHONPATH": "src"}
    cmd = [sys.executable, "-m", "folklm.cli.main", "serve", str(bpe_models("llama"))]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--max-len", "64"],
        env=env,
        cwd=Path(__file__).parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        ok = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sk-from-env"})
        assert ok.status_code == 200
        assert "sk-from-env" not in " ".join(psutil.Process(proc.pid).cmdline())
    finally:
        proc.terminate()
        proc.wait(timeout=30)

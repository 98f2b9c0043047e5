"""``folk serve`` as a real process, and adapters found through the hub's lineage."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

from folklm.serve.app import ServeConfig, build_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_folk_serve_process(bpe_models, tmp_path):
    port = free_port()
    keys = tmp_path / "keys.txt"
    keys.write_text("# keys\nsk-one\n\nsk-two\n")
    cmd = [sys.executable, "-m", "folklm.cli.main", "serve", str(bpe_models("llama")),
           "--port", str(port), "--api-keys-file", str(keys), "--max-batch", "4"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sk-two"})
        assert r.status_code == 200 and r.json()["data"][0]["object"] == "model"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapter", "x"], "expected NAME=BASE:FOLDER"),
        (["--api-keys-file", "/nonexistent/keys"], "cannot read API keys file"),
    ],
)
def test_folk_serve_bad_flags(args, message):
    r = subprocess.run(
        [sys.executable, "-m", "folklm.cli.main", "serve", *args], capture_output=True, text=True
    )
    assert r.returncode == 1 and r.stderr.startswith("folk: error:") and message in r.stderr
    assert "Traceback" not in r.stderr


def test_adapter_from_hub_lineage(bpe_models, tmp_path, monkeypatch, random_adapter):
    import asyncio

    import folklm
    from folklm.hub.register import Derivation, register_model

    monkeypatch.setenv("FOLK_HOME", str(tmp_path / "home"))
    base = bpe_models("llama")
    register_model(base, "tinybase", Derivation("import", license="apache-2.0"))
    config = folklm.load(base, dtype="float32").config
    adir = random_adapter(tmp_path / "ad", config, 4, ["q_proj", "v_proj", "down_proj"], 5, 0.5)
    register_model(adir, "tinyadapter", Derivation("adapter", parents=["tinybase"]))
    app = build_app(ServeConfig(models=["tinybase"], names=["tinybase"]))

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
                listed = (await c.get("/v1/models")).json()["data"]  # found in the hub
                assert "tinyadapter" in {m["id"] for m in listed}
                out = {}
                for model in ("tinybase", "tinyadapter", "tinybase:tinyadapter", "tinybase:nope"):
                    body = {"model": model, "prompt": "To be or not", "max_tokens": 8,
                            "temperature": 0}  # fmt: skip
                    r = await c.post("/v1/completions", json=body)
                    out[model] = (r.status_code, r.json())
                models = (await c.get("/v1/models")).json()["data"]
                return out, models

    out, models = asyncio.run(run())
    assert out["tinybase:nope"][0] == 404
    texts = {m: o[1]["choices"][0]["text"] for m, o in out.items() if o[0] == 200}
    assert texts["tinyadapter"] == texts["tinybase:tinyadapter"] != texts["tinybase"]
    assert {"id": "tinyadapter", "parent": "tinybase"}.items() <= next(
        m for m in models if m["id"] == "tinyadapter"
    ).items()

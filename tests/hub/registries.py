"""Local servers that speak the Hugging Face Hub and Ollama registry protocols, for the
pull tests: real HTTP on 127.0.0.1, driven by the real ``huggingface_hub`` client and by
folklm's registry client. Fixtures are tiny models the tests make (a GGUF written with the
``gguf`` package, a safetensors folder written with ``safetensors.numpy``).

Hugging Face (what ``huggingface_hub`` 2.x asks, read from its ``file_download.py`` and
``hf_api.py``):

* ``GET /api/models/ORG/REPO/revision/REV?blobs=True``: ``sha`` (the commit), ``siblings``
  with ``size``, ``blobId`` and ``lfs.sha256``, ``cardData``;
* ``HEAD|GET /ORG/REPO/resolve/COMMIT/FILE``: ``X-Repo-Commit`` and ``ETag`` (the git blob
  sha1) for small files; for LFS files a 302 to a second server (another origin, like the
  Hub's CDN) carrying ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``;
* the "CDN" serves ranged GETs (``Range: bytes=N-`` -> 206 ``Content-Range``);
* a gated repository answers 401 with ``X-Error-Code: GatedRepo`` without the token.

Ollama: ``GET /v2/NS/MODEL/manifests/TAG`` and ``GET /v2/NS/MODEL/blobs/sha256:HEX``
(ranged too).

Faults, per file or blob: ``drop`` (send half the body, then close the connection, once),
``corrupt`` (serve bytes that do not hash to the advertised digest).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from hubtest import folk

GOOD_TOKEN = "hf_test_token_granted"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_gguf(path: Path, license: str | None = "apache-2.0", seed: int = 0) -> Path:
    """A small llama-architecture GGUF (two f32 tensors, a 4-token vocabulary, a ChatML
    chat template), written with llama.cpp's ``gguf`` package."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    if license:
        w.add_license(license)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<|im_start|>", "<|im_end|>", "a", "b"])
    w.add_eos_token_id(1)
    w.add_chat_template(CHATML)
    rng = np.random.default_rng(seed)
    w.add_tensor("token_embd.weight", rng.standard_normal((4, 8), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((8, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_folder_files(
    seed: int = 0, license: str = "apache-2.0", rows: int = 16
) -> dict[str, bytes]:
    """A small Hugging Face model folder (config, safetensors weights, model card);
    ``rows`` x 8 float32 per weight matrix."""
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    weights = save(
        {
            "model.embed_tokens.weight": rng.standard_normal((rows, 8), dtype=np.float32),
            "lm_head.weight": rng.standard_normal((rows, 8), dtype=np.float32),
        },
        metadata={"format": "pt"},
    )
    config = {"model_type": "llama", "hidden_size": 8, "vocab_size": 16}
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": weights,
        "README.md": f"---\nlicense: {license}\n---\n# tiny\n".encode(),
        "pytorch_model.bin": b"pickle, never pulled by default",
    }


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def is_lfs(name: str) -> bool:
    return name.endswith((".safetensors", ".gguf", ".bin"))


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False
    license: str | None = "apache-2.0"


@dataclass
class Faults:
    drop: set[str] = field(default_factory=set)  # file names / digests: cut once, mid-body
    corrupt: set[str] = field(default_factory=set)  # serve flipped bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Base(BaseHTTPRequestHandler):
    owner: Any  # the FakeHub / FakeOllama
    server_is_cdn = False

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_ranged(self, key: str, data: bytes, headers: dict[str, str]) -> None:
        """200 or 206 for ``Range: bytes=N-``; the faults of ``key`` applied."""
        faults: Faults = self.owner.faults
        if key in faults.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        rng = self.headers.get("Range")
        self.owner.log.append((self.command, self.path, rng))
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        body = data[start:]
        h = dict(headers)
        h["Content-Length"] = str(len(body))
        h["Accept-Ranges"] = "bytes"
        if rng:
            h["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self.send_response(206 if rng else 200)
        for k, v in h.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        if key in faults.drop and not rng:
            faults.drop.discard(key)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the peer sees a truncated body
            return
        self.wfile.write(body)


class _HubHandler(_Base):
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) == 4:
            return self._model_info("/".join(parts[2:4]), "main")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
            return self._model_info("/".join(parts[2:4]), parts[5])
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        if parts[0] == "lfs" and len(parts) == 2:
            return self._lfs(parts[1])
        self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"})

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.owner.repos.get(repo_id)
        if repo is None:
            self._send(
                401,
                b'{"error":"Repository not found"}',
                {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
            )
        return repo

    def _model_info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if rev not in ("main", repo.commit):
            self._send(404, b"{}", {"X-Error-Code": "RevisionNotFound"})
            return
        siblings = []
        for name, data in sorted(repo.files.items()):
            s: dict[str, Any] = {"rfilename": name, "size": len(data), "blobId": git_sha1(data)}
            if is_lfs(name):
                sha = hashlib.sha256(data).hexdigest()
                s["lfs"] = {"sha256": sha, "size": len(data), "pointerSize": 134}
            siblings.append(s)
        body = {
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.commit,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "siblings": siblings,
            "cardData": {"license": repo.license} if repo.license else {},
        }
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _resolve(self, repo_id: str, rev: str, name: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if repo.gated and self.headers.get("Authorization") != f"Bearer {GOOD_TOKEN}":
            msg = f"Access to model {repo_id} is restricted. You must be authenticated."
            self._send(401, msg.encode(), {"X-Error-Code": "GatedRepo", "X-Error-Message": msg})
            return
        if rev != repo.commit or name not in repo.files:
            self._send(404, b"{}", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit})
            return
        data = repo.files[name]
        if is_lfs(name):
            self.owner.log.append((self.command, self.path, self.headers.get("Range")))
            sha = hashlib.sha256(data).hexdigest()
            self.owner.lfs[sha] = (name, data)
            self._send(
                302,
                b"",
                {
                    "Location": f"{self.owner.cdn_url}/lfs/{sha}",
                    "X-Repo-Commit": repo.commit,
                    "ETag": f'"{git_sha1(data)}"',
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": str(len(data)),
                },
            )
            return
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{git_sha1(data)}"'}
        self._send_ranged(name, data, headers)

    def _lfs(self, sha: str) -> None:
        if sha not in self.owner.lfs:
            self._send(404)
            return
        name, data = self.owner.lfs[sha]
        self._send_ranged(name, data, {"Content-Type": "application/octet-stream"})


class _Serving:
    """Start/stop a handler class on 127.0.0.1 in a thread."""

    def _serve(self, handler: type[_Base], cdn: bool = False) -> tuple[_Server, str]:
        cls = type("Handler", (handler,), {"owner": self, "server_is_cdn": cdn})
        server = _Server(("127.0.0.1", 0), cls)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}"


class FakeHub(_Serving):
    """A Hugging Face Hub endpoint (``HF_ENDPOINT=hub.url``) and its "CDN"."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self.log: list[tuple[str, str, str | None]] = []
        self.lfs: dict[str, tuple[str, bytes]] = {}
        self._hub, self.url = self._serve(_HubHandler)
        self._cdn, self.cdn_url = self._serve(_HubHandler)

    def close(self) -> None:
        for s in (self._hub, self._cdn):
            s.shutdown()
            s.server_close()


class _OllamaHandler(_Base):
    def do_GET(self) -> None:
        reg: FakeOllama = self.owner
        parts = self.path.strip("/").split("/")
        if parts[0] != "v2" or len(parts) != 5:
            return self._send(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}')
        name, kind, ref = f"{parts[1]}/{parts[2]}", parts[3], parts[4]
        if (
            name in reg.private
            and not self.server_is_cdn
            and self.headers.get("Authorization") != f"Bearer {reg.token}"
        ):
            return self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}')
        if kind == "manifests":
            manifest = reg.manifests.get(f"{name}:{ref}")
            if manifest is None:
                return self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
            reg.log.append((self.command, self.path, self.headers.get("Accept")))
            return self._send(200, manifest, {"Content-Type": MANIFEST_TYPE})
        if kind == "blobs" and ref in reg.blobs and reg.cdn_url and not self.server_is_cdn:
            return self._send(307, b"", {"Location": f"{reg.cdn_url}/v2/{name}/blobs/{ref}"})
        if kind == "blobs" and ref in reg.blobs:
            reg.cdn_log.append(dict(self.headers)) if self.server_is_cdn else None
            return self._send_ranged(ref, reg.blobs[ref], {})
        self._send(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')


MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


class FakeOllama(_Serving):
    """An Ollama registry: ``add()`` a model, then ``folk pull ollama:NAME --registry url``."""

    def __init__(self, cdn: bool = False) -> None:
        """``cdn``: blobs are answered with a 307 to a second server (another origin), as
        registry.ollama.ai sends them to its CDN; ``cdn_log`` holds the headers it got."""
        self.manifests: dict[str, bytes] = {}
        self.cdn_url: str | None = None
        self.cdn_log: list[dict[str, str]] = []
        self.blobs: dict[str, bytes] = {}
        self.private: set[str] = set()
        self.token = "ollama-secret"
        self.faults = Faults()
        self.log: list[tuple[str, str, str | None]] = []
        self._server, self.url = self._serve(_OllamaHandler)
        self._cdn = None
        if cdn:
            self._cdn, self.cdn_url = self._serve(_OllamaHandler, cdn=True)

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def add(self, name: str, gguf: bytes, texts: dict[str, str]) -> dict[str, Any]:
        """Publish ``library/NAME:TAG`` with a model layer and text layers
        (``{"template": ..., "params": ..., "license": ...}``)."""
        layers = [self.blob(gguf, "application/vnd.ollama.image.model")]
        for kind, text in texts.items():
            layers.append(self.blob(text.encode(), f"application/vnd.ollama.image.{kind}"))
        config = {
            "model_format": "gguf",
            "model_family": "llama",
            "file_type": "F32",
            "rootfs": {"type": "layers", "diff_ids": [x["digest"] for x in layers]},
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": self.blob(
                json.dumps(config).encode(), "application/vnd.docker.container.image.v1+json"
            ),
            "layers": layers,
        }
        model, _, tag = name.partition(":")
        key = f"{model if '/' in model else 'library/' + model}:{tag or 'latest'}"
        self.manifests[key] = json.dumps(manifest).encode()
        return manifest

    def close(self) -> None:
        for server in (self._server, self._cdn):
            if server is not None:
                server.shutdown()
                server.server_close()


def pull_json(*args: str, env: dict | None = None) -> dict:
    """``folk pull ARGS --json`` through the real CLI; its JSON report (exit 0 asserted)."""
    proc = folk("pull", *args, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)

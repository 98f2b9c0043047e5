"""``folk pull hf:`` with the real ``huggingface_hub`` client, and ``folk import`` of the
Hugging Face cache, against a local Hub server (``registries.FakeHub``) on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import pytest
from hubtest import assert_one_line_error, folk
from registries import (
    GOOD_TOKEN,
    FakeHub,
    Repo,
    git_sha1,
    pull_json,
    tiny_folder_files,
    tiny_gguf,
)

from folklm.hub import api


@pytest.fixture
def hub(home, tmp_path, monkeypatch):
    """A local Hub with ``org/tiny`` (a safetensors folder), ``org/ggufs`` (one GGUF
    without a licence of its own, an MIT model card) and ``org/gated``; a fresh HF cache."""
    server = FakeHub()
    server.repos["org/tiny"] = Repo(tiny_folder_files())
    gguf = tiny_gguf(tmp_path / "tiny.Q8_0.gguf", license=None).read_bytes()
    server.repos["org/ggufs"] = Repo(
        {"tiny.Q8_0.gguf": gguf, "README.md": b"---\nlicense: mit\n---\n"},
        commit="89abcdef0123456789abcdef0123456789abcdef",
        license="mit",
    )
    server.repos["org/gated"] = Repo(tiny_folder_files(seed=1), gated=True)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield server
    server.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_pull_hf_folder_records_origin_and_links_the_cache(hub, home, tmp_path):
    files = hub.repos["org/tiny"].files
    commit = hub.repos["org/tiny"].commit
    out = pull_json("hf:org/tiny")  # revision "main", resolved to the commit once
    entry = out["entry"]
    assert entry["name"] == "tiny:latest"
    got = {f["path"]: f["sha256"] for f in entry["files"]}
    # pickles are never pulled by default
    assert got == {n: sha256(files[n]) for n in ("README.md", "config.json", "model.safetensors")}
    src = entry["source"]
    assert src["commit"] == commit and src["url"] == f"{hub.url}/org/tiny"
    assert src["files"]["model.safetensors"]["sha256"] == sha256(files["model.safetensors"])
    assert src["files"]["config.json"]["git_blob_sha1"] == git_sha1(files["config.json"])
    assert entry["license"]["expression"] == "apache-2.0"
    # every file was fetched at the pinned commit, the weights through a redirect
    resolved = [p for m, p, _ in hub.log if "/resolve/" in p]
    assert resolved and all(f"/resolve/{commit}/" in p for p in resolved)
    assert any(p.startswith("/lfs/") for _, p, _ in hub.log)
    # linked from the Hugging Face cache, not copied
    snapshot = tmp_path / "hf-home/hub/models--org--tiny/snapshots" / commit
    cache_blob = Path(os.path.realpath(snapshot / "model.safetensors"))
    hub_blob = home / "hub/blobs" / f"sha256-{sha256(files['model.safetensors'])}"
    assert set(out["placed"].values()) <= {"reflink", "hardlink"}
    if out["placed"]["model.safetensors"] == "hardlink":
        assert cache_blob.stat().st_ino == hub_blob.stat().st_ino
    assert [t["file"] for t in out["transfers"]] == sorted(got)


def test_pull_hf_resumes_a_dropped_download_to_the_same_hash(hub, home):
    # huggingface_hub writes in 10 MiB chunks: 24 MiB of weights so that the first cut
    # comes after a chunk reached the disk
    files = tiny_folder_files(rows=3 << 17)
    weights = files["model.safetensors"]
    hub.repos["org/big"] = Repo(files)
    hub.faults.drop.add("model.safetensors")  # half the body, then the connection closes
    out = pull_json("hf:org/big")
    ranges = [r for _, p, r in hub.log if p.startswith("/lfs/") and r]
    assert len(ranges) == 1, hub.log  # one resumed request, from where the disk stopped
    start = int(ranges[0].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= len(weights) // 2
    got = {f["path"]: f["sha256"] for f in out["entry"]["files"]}
    assert got["model.safetensors"] == sha256(weights)
    (t,) = [t for t in out["transfers"] if t["file"] == "model.safetensors"]
    assert t["size"] == len(weights) and t["fetched"] >= len(weights)


def test_pull_hf_refuses_a_corrupted_file_and_registers_nothing(hub, home):
    hub.faults.corrupt.add("model.safetensors")
    proc = folk("pull", "hf:org/tiny")
    assert_one_line_error(proc, "hf:org/tiny", "model.safetensors", "sha256", "refused")
    assert api.list_models() == []
    assert not list((home / "hub" / "blobs").glob("*"))
    hub.faults.corrupt.clear()  # the bad file was not kept as "already downloaded"
    out = pull_json("hf:org/tiny")
    assert out["entry"]["name"] == "tiny:latest"


def test_pull_hf_gated_without_token_is_one_clear_line(hub, home, tmp_path):
    proc = folk("pull", "hf:org/gated")
    assert_one_line_error(proc, "hf:org/gated", "401", "gated", "HF_TOKEN")
    assert api.list_models() == []
    proc = folk("pull", "hf:org/gated", env={"HF_TOKEN": GOOD_TOKEN})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("pulled gated:latest  sha256:")
    weights = len(hub.repos["org/gated"].files["model.safetensors"])
    # piped (no terminal): one line per transfer with its size and speed
    line = [x for x in proc.stderr.splitlines() if "model.safetensors" in x]
    assert re.fullmatch(
        rf"fetched model\.safetensors  {weights / 1e3:.1f} KB in \d+\.\d s \(.+/s\)", line[0]
    )
    # the login file of `hf auth login` serves too (a fresh cache: the files must be fetched)
    (tmp_path / "hf-home" / "token").write_text(GOOD_TOKEN)
    fresh = {"HF_HUB_CACHE": str(tmp_path / "fresh-cache")}
    out = pull_json("hf:org/gated", "--name", "from-login", env=fresh)
    assert out["entry"]["name"] == "from-login:latest"
    assert all(t["fetched"] == t["size"] > 0 for t in out["transfers"])
    (tmp_path / "hf-home" / "token").unlink()
    fresh = {"HF_HUB_CACHE": str(tmp_path / "fresh-cache-2")}
    assert_one_line_error(folk("pull", "hf:org/gated", env=fresh), "401", "HF_TOKEN")


def test_pull_hf_one_gguf_takes_the_licence_from_the_model_card(hub, home):
    commit = hub.repos["org/ggufs"].commit
    out = pull_json("hf:org/ggufs/tiny.Q8_0.gguf@main")
    entry = out["entry"]
    assert entry["name"] == "tiny:q8_0" and entry["format"] == "gguf"
    assert [f["path"] for f in entry["files"]] == ["tiny.Q8_0.gguf"]
    assert entry["license"]["expression"] == "mit"
    assert entry["license"]["source"] == f"README.md of hf:org/ggufs@{commit}"
    assert entry["source"]["commit"] == commit


def test_pull_hf_errors_are_one_line(hub, home):
    assert_one_line_error(folk("pull", "hf:org/missing"), "hf:org/missing", "no such repository")
    assert_one_line_error(folk("pull", "hf:org/tiny@v9"), "no such revision")
    assert_one_line_error(folk("pull", "hf:org/tiny/x.gguf"), "no file 'x.gguf'")
    assert_one_line_error(folk("pull", "hf:org/tiny", "--include", "*.nope"), "--include")
    assert_one_line_error(folk("pull", "hf:org"), "expected hf:ORG/REPO")
    assert_one_line_error(folk("pull", "org/tiny"), "unknown source")


def test_import_hf_cache_offline_links_and_checks_every_blob(hub, home, tmp_path):
    pull_json("hf:org/tiny")
    hub.close()  # the cache import needs no network
    proc = folk("import", "hf:org/tiny", "--name", "again", "--json")
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(proc.stdout)
    assert entry["source"]["origin"] == "huggingface-cache"
    assert set(entry["placed"].values()) <= {"reflink", "hardlink"}
    assert entry["digest"] == api.show("tiny").digest
    # a snapshot path works too; a blob that no longer hashes to its name is refused
    snapshot = tmp_path / "hf-home/hub/models--org--tiny/snapshots" / hub.repos["org/tiny"].commit
    blob = Path(os.path.realpath(snapshot / "config.json"))
    blob.chmod(0o644)
    blob.write_bytes(b'{"model_type": "llama", "hidden_size": 9}')
    proc = folk("import", str(snapshot), "--name", "tampered")
    assert_one_line_error(proc, "config.json", "git blob sha1", "refused")
    assert "tampered:latest" not in {r["name"] for r in api.list_models()}


def test_hf_snapshot_link_leaving_its_blobs_is_refused(home, tmp_path):
    snapshot = tmp_path / "hub/models--org--evil/snapshots/abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "hub/models--org--evil/blobs").mkdir()
    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    (snapshot / "config.json").symlink_to(outside)
    proc = folk("import", str(snapshot))
    assert_one_line_error(proc, "config.json", "outside", "refused")


def test_pull_on_a_terminal_draws_bars_with_size_and_speed(hub, home):
    """On a terminal (a pseudo-terminal here) each transfer gets a rich bar: done/total
    size, speed and time left."""
    import pty

    hub.repos["org/big"] = Repo(tiny_folder_files(rows=3 << 17))  # 24 MiB: several updates
    size = len(hub.repos["org/big"].files["model.safetensors"])
    pid, fd = pty.fork()
    if pid == 0:  # the child: `folk pull` with the pty as its terminal
        os.execvpe(
            sys.executable,
            [sys.executable, "-m", "folklm.cli.main", "pull", "hf:org/big"],
            {**os.environ, "COLUMNS": "150"},
        )
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    assert os.waitstatus_to_exitcode(status) == 0, text[-2000:]
    assert f"{size / 1e6:.1f}/{size / 1e6:.1f} MB" in text  # rich's DownloadColumn
    assert re.search(r"model\.safetensors .* \d+\.\d [kMG]?B/s", text)  # TransferSpeedColumn
    assert "pulled big:latest" in text

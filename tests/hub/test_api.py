"""The hub's library API on a real SQLite catalogue and real files (FOLK_HOME per test)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hubtest import IMPORTER, snapshot, variant

import folklm
from folklm import datasets
from folklm.errors import FolkError
from folklm.hub import api
from folklm.hub.store import Store, manifest_digest, sha256_file

pytestmark = [
    pytest.mark.filterwarnings("ignore:no licence found"),
    pytest.mark.filterwarnings("ignore:the licence of parent"),
]


def blob_names(home: Path) -> set[str]:
    return {p.name for p in (home / "hub" / "blobs").iterdir()}


def test_register_model_records_the_whole_recipe(home, tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    base = api.import_path(folder, "base:v1", license="apache-2.0")
    child_folder = variant(folder, tmp_path / "child", seed=1)
    started = time.time() - 2.5
    data = [datasets.path("gsm8k/train.jsonl")]
    recipe = {"method": "lora", "rank": 8, "alpha": 16, "lr": 2e-4, "epochs": 3, "batch_size": 4}
    child = api.register_model(
        child_folder,
        "child",
        api.Derivation(
            "finetune",
            parents=["base:v1"],
            recipe=recipe,
            data_files=data,
            seed=1234,
            started_at=started,
            compute={"flops": 1.5e12},
            description="Grade-school maths answers.",
        ),
    )
    shown = api.show("child")
    for e in (child, shown):
        assert e.operation == "finetune" and e.recipe == recipe and e.seed == 1234
        assert e.parents == [
            {
                "name": "base:v1",
                "content_hash": f"sha256:{base.digest}",
                "tags": ["base:v1"],
                "removed": False,
                "license": "apache-2.0",
            }
        ]
        [d] = e.data_files
        assert d["sha256"] == sha256_file(data[0])[0] and d["license"] == "mit"
        assert e.folklm_version == folklm.__version__ == e.environment["folklm"]
        assert e.compute["flops"] == 1.5e12 and e.compute["duration_s"] >= 2.5
        assert e.compute["hardware"]  # recorded automatically
        assert e.started_at < e.created_at
        assert e.license["expression"] == "apache-2.0"
    # The content hash is the manifest's hash; shared files are stored once.
    files = [(f["path"], f["sha256"], f["size"]) for f in shown.files]
    assert shown.digest == manifest_digest(files)
    assert {f["sha256"] for f in shown.files} - {f["sha256"] for f in base.files} == {
        f["sha256"] for f in shown.files if f["path"] == "model.safetensors"
    }
    assert len(blob_names(home)) == len(base.files) + 1


def test_resolve_model_loads_zero_copy_from_the_blobs(home, tiny_models):
    model, folder = tiny_models("llama")
    entry = api.import_path(folder, "tiny")
    path = api.resolve_model("tiny")
    weights = path / "model.safetensors"
    assert weights.is_symlink()
    blob = Store(home).blob_path(
        next(f["sha256"] for f in entry.files if f["path"] == "model.safetensors")
    )
    assert Path(os.path.realpath(weights)) == blob.resolve()
    llm = folklm.load("tiny:latest", fast=False, dtype="float32")
    ids = torch.tensor([[5, 9, 17, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(llm.model(ids), model(ids).logits, atol=1e-5, rtol=1e-5)
    # The weights are views into the memory-mapped blob (no copy in RAM).
    maps = Path(f"/proc/{os.getpid()}/maps").read_text()
    assert str(blob.resolve()) in maps


def test_unknown_names_are_one_line_errors(home):
    with pytest.raises(FolkError) as e:
        folklm.load("nosuchmodel", dtype="float32")
    assert str(e.value) == "unknown model 'nosuchmodel:latest'; see folk ls"
    with pytest.raises(FolkError, match=r"^unknown model 'x:v2'; see folk ls$"):
        api.resolve_model("x:v2")
    assert not home.exists()  # looking a name up creates no hub


def test_bad_input_writes_nothing(home, tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    api.import_path(folder, "present")
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "README.md").write_text("# just notes")
    truncated = tmp_path / "broken"
    truncated.mkdir()
    (truncated / "config.json").write_text('{"model_type": "llama"}')
    (truncated / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    data_file = datasets.path("gsm8k/train.jsonl")  # decompressed before the snapshot
    before = snapshot(home)
    calls = [
        (lambda: api.import_path(folder, "a/b"), "contains '/'"),
        (lambda: api.import_path(folder, ".."), "contains '..'"),
        (lambda: api.import_path(folder, "my model"), "contains a space"),
        (lambda: api.import_path(folder, "bad\x1bname"), "control character"),
        (lambda: api.import_path(not_a_model, "x"), "not a model (no config.json"),
        (lambda: api.import_path(truncated, "x"), "truncated or not a safetensors file"),
        (lambda: api.import_path(tmp_path / "missing", "x"), "no such file or folder"),
        (lambda: api.import_path(data_file, "x"), "not a model"),
        (lambda: api.tag("absent:v9", "other"), "unknown model 'absent:v9'"),
        (lambda: api.tag("present", "bad name"), "contains a space"),
        (lambda: api.remove("present:v2"), "unknown model 'present:v2'"),
        (lambda: api.show("present:nope"), "unknown model 'present:nope'"),
        (
            lambda: api.register_model(folder, "c", api.Derivation("finetune", parents=["absent"])),
            "unknown model 'absent:latest'",
        ),
        (
            lambda: api.register_model(
                folder, "c", api.Derivation("finetune", recipe={"f": object()})
            ),
            "recipe must be JSON-serialisable",
        ),
        (lambda: api.add_evaluation("present", "arc", "acc", float("nan")), "finite number"),
    ]
    for call, words in calls:
        with pytest.raises(FolkError) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value), (words, str(e.value))
        assert snapshot(home) == before, words


def test_rm_keeps_blobs_other_entries_use(home, tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    a = api.import_path(folder, "a")
    b = api.register_model(
        variant(folder, tmp_path / "b", 2), "b", api.Derivation("finetune", parents=["a"])
    )
    shared = {f["sha256"] for f in a.files} & {f["sha256"] for f in b.files}
    assert len(shared) == len(a.files) - 1  # all but the weights
    report = api.remove("a")
    assert report["deleted_blobs"] == 1 and report["kept_shared_blobs"] == len(shared)
    assert {f"sha256-{s}" for s in shared} <= blob_names(home)
    assert api.verify()["problems"] == []
    assert [r["name"] for r in api.list_models()] == ["b:latest"]
    tree = api.lineage("b")  # the parent's record outlives its files
    assert tree.parents[0].removed and tree.parents[0].content_hash == f"sha256:{a.digest}"
    api.remove("b")
    assert blob_names(home) == set()
    assert not any((home / "hub" / "entries").iterdir())


def test_tags_share_one_model_and_moving_a_tag_retires_the_old_model(home, tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    a = api.import_path(folder, "a")
    api.tag("a", "alias:stable")
    assert api.resolve_model("alias:stable") == api.resolve_model("a")
    api.remove("a")  # the model keeps its other tag: nothing deleted
    assert api.verify("alias:stable")["problems"] == []
    other = api.import_path(variant(folder, tmp_path / "v", 3), "other")
    api.tag("other", "alias:stable")  # moves the tag; the first model has none left
    assert api.show("alias:stable").digest == other.digest
    assert {
        f"sha256-{f['sha256']}" for f in a.files if f["path"] == "model.safetensors"
    }.isdisjoint(blob_names(home))


def test_reimporting_the_same_files_changes_nothing(home, tiny_models):
    _, folder = tiny_models("llama")
    first = api.import_path(folder, "same")
    with pytest.warns(api.HubWarning, match="already holds these files"):
        again = api.import_path(folder, "same")
    assert again.id == first.id and len(api.list_models()) == 1


def test_verify_finds_a_corrupted_blob(home, tiny_models):
    _, folder = tiny_models("llama")
    entry = api.import_path(folder, "victim:v1")
    assert api.verify()["problems"] == []
    sha = next(f["sha256"] for f in entry.files if f["path"] == "config.json")
    blob = Store(home).blob_path(sha)
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes().replace(b"llama", b"LLAMA"))
    [problem] = api.verify()["problems"]
    assert problem["entries"] == "victim:v1" and problem["file"] == "config.json"
    assert problem["problem"].startswith("content changed")
    blob.unlink()
    assert api.verify("victim:v1")["problems"][0]["problem"] == "blob missing"


def test_gc_removes_orphans_and_stale_temporary_files(home, tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    api.import_path(folder, "kept")
    store = Store(home)
    orphan = tmp_path / "orphan.bin"
    orphan.write_bytes(b"left behind by an interrupted import")
    sha, _ = store.put(orphan)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    (store.tmp / f"{dead}-0123.blob").write_bytes(b"partial")
    (store.tmp / f"{os.getpid()}-4567.blob").write_bytes(b"being written")  # a live writer
    assert api.verify()["unreferenced"] == 1
    report = api.collect_garbage()
    assert report["blobs"] == 1 and report["temporary"] == 1
    assert not store.blob_path(sha).exists()
    assert (store.tmp / f"{os.getpid()}-4567.blob").exists()
    assert api.verify() == {**api.verify(), "problems": [], "unreferenced": 0}
    assert api.collect_garbage()["blobs"] == 0


def test_evaluations_are_attached_to_the_model(home, tiny_models):
    _, folder = tiny_models("llama")
    api.import_path(folder, "evald")
    arc = datasets.path("arc_easy/arc_easy.jsonl")
    rec = api.add_evaluation(
        "evald",
        "arc_easy",
        "acc",
        0.25,
        0.012,
        n_samples=2376,
        dataset=arc,
        split="test",
        config={"num_fewshot": 0, "seed": 0},
    )
    assert rec["dataset_sha256"] == sha256_file(arc)[0]
    [shown] = api.show("evald").evaluations
    assert shown["value"] == 0.25 and shown["stderr"] == 0.012 and shown["config"]["seed"] == 0


def test_catalogue_is_sqlite_in_wal_mode(home, tiny_models):
    _, folder = tiny_models("llama")
    api.import_path(folder, "w")
    conn = sqlite3.connect(home / "hub" / "catalogue.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables >= {
        "models",
        "tags",
        "files",
        "blobs",
        "lineage",
        "licenses",
        "recipes",
        "data_files",
        "evaluations",
    }
    row = conn.execute("SELECT recipe, environment FROM recipes").fetchone()
    assert json.loads(row[0]) == {} and json.loads(row[1])["python"]


def test_two_processes_importing_at_once_both_succeed(home, tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    script = tmp_path / "importer.py"
    script.write_text(IMPORTER)
    folders = [variant(folder, tmp_path / f"m{i}", 10 + i) for i in range(4)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # Two pairs at once: different models sharing their tokenizer blobs, then one name twice.
    for jobs in (
        [(folders[0], "one"), (folders[1], "two")],
        [(folders[2], "same"), (folders[3], "same")],
    ):
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), str(f), n],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for f, n in jobs
        ]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0 and "done" in out, err
    names = [r["name"] for r in api.list_models()]
    assert names == ["one:latest", "same:latest", "two:latest"]
    assert api.verify()["problems"] == []
    winners = {folder_digest(folders[2]), folder_digest(folders[3])}
    assert api.show("same").digest in winners  # the tag points at one complete model


def folder_digest(folder: Path) -> str:
    files = [(p.name, *sha256_file(p)) for p in folder.iterdir() if p.is_file()]
    return manifest_digest(files)


def test_register_from_a_mapping_of_files(home, tiny_models):
    """Operations that write their outputs in several places name each file of the entry."""
    _, folder = tiny_models("llama")
    files = {p.name: p for p in folder.iterdir()}
    entry = api.register_model(files, "mapped", api.Derivation("import", license="mit"))
    assert sorted(f["path"] for f in entry.files) == sorted(files)
    assert (api.resolve_model("mapped") / "config.json").read_bytes() == (
        folder / "config.json"
    ).read_bytes()
    for bad in ("../config.json", "/abs/config.json", ".hidden"):
        with pytest.raises(FolkError, match="invalid file name"):
            api.register_model({bad: folder / "config.json"}, "x", "import")

"""The hub commands as a user runs them: ``folk`` in a real process, real files, exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hubtest import SESSION_HOME, assert_one_line_error, folk, folk_parallel, snapshot, variant

from folklm.hub import api
from folklm.hub.store import Store

pytestmark = pytest.mark.filterwarnings("ignore:no licence found")


def test_import_ls_show(home, tiny_models):
    _, folder = tiny_models("llama")
    proc = folk("import", str(folder), "--name", "Tiny-Llama:v1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("imported tiny-llama:v1  sha256:")
    assert (
        proc.stderr == "folk: warning: no licence found for tiny-llama:v1; pass --license SPDX-ID\n"
    )
    entry = api.import_path(folder, license="Apache-2.0")  # the same files, a second name
    ls, ls_json, show, show_json = folk_parallel(
        ("ls",), ("ls", "--json"), ("show", "tiny-llama:v1"), ("show", entry.name, "--json")
    )
    header, *rows = ls.stdout.splitlines()
    assert header.split() == ["NAME", "ID", "ARCH", "PARAMS", "SIZE", "QUANT", "LICENCE", "CREATED"]
    row = next(r for r in rows if r.startswith(entry.name))
    assert row.split()[1:8] == [
        entry.digest[:12],
        "llama",
        "78.1K",
        "318.3",
        "KB",
        "F32",
        "apache-2.0",
    ]
    listed = json.loads(ls_json.stdout)
    assert {r["name"] for r in listed} == {"tiny-llama:v1", entry.name}
    assert all(r["content_hash"] == f"sha256:{entry.digest}" for r in listed)
    assert f"sha256:{entry.digest}" in show.stdout
    for f in entry.files:
        assert f["sha256"] in show.stdout and f["path"] in show.stdout
    assert '"num_hidden_layers": 2' in show.stdout  # the config
    shown = json.loads(show_json.stdout)
    assert shown["license"]["expression"] == "apache-2.0" and shown["parents"] == []
    assert shown["operation"] == "import" and shown["source"]["path"] == str(folder)
    assert shown["files"] == entry.files and shown["tags"] == [entry.name]


def test_tag_lineage_rm_gc(home, tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    assert folk("import", str(folder), "--name", "base", "--license", "llama3.1").returncode == 0
    with pytest.warns(api.HubWarning, match='"Llama" at the beginning'):
        api.register_model(
            variant(folder, tmp_path / "t", 5),
            "tuned",
            api.Derivation("finetune", parents=["base"], recipe={"lr": 1e-4}),
        )
    tag = folk("tag", "tuned", "llama-3.1-tuned:v1")
    assert tag.returncode == 0 and tag.stdout.startswith("tagged llama-3.1-tuned:v1")
    base_hash, tuned_hash = api.show("base").digest[:12], api.show("tuned").digest[:12]
    tree, tree_json = folk_parallel(
        ("lineage", "llama-3.1-tuned:v1"), ("lineage", "tuned", "--json")
    )
    assert tree.stdout.splitlines() == [
        f"llama-3.1-tuned:v1  finetune  sha256:{tuned_hash}  llama3.1",
        f"└── base:latest  import  sha256:{base_hash}  llama3.1",
    ]
    data = json.loads(tree_json.stdout)
    assert data["operation"] == "finetune" and data["recipe"] == {"lr": 1e-4}
    assert data["parents"][0]["content_hash"] == f"sha256:{api.show('base').digest}"
    rm = folk("rm", "tuned", "llama-3.1-tuned:v1", "--json")
    first, second = json.loads(rm.stdout)
    assert first["other_tags"] == ["llama-3.1-tuned:v1"] and "deleted_blobs" not in first
    assert second["deleted_blobs"] == 1  # its weights; the other files are shared with base
    Store(home).put(Path(__file__))  # a blob no entry references
    gc = folk("gc")
    assert gc.stdout.startswith("removed 1 blob(s)")
    assert [r["name"] for r in api.list_models()] == ["base:latest"]
    assert api.verify()["unreferenced"] == 0


def test_verify_reports_a_corrupted_blob_and_exits_non_zero(home, tiny_models):
    _, folder = tiny_models("llama")
    entry = api.import_path(folder, "checked:v2")
    ok = folk("verify")
    assert ok.returncode == 0 and "0 problem(s)" in ok.stdout
    sha = next(f["sha256"] for f in entry.files if f["path"] == "model.safetensors")
    blob = Store(home).blob_path(sha)
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:  # one flipped byte deep inside the weights
        f.seek(blob.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    bad = folk("verify")
    assert bad.returncode == 1
    failed = f"FAILED checked:v2: model.safetensors (sha256:{sha[:12]}): content changed"
    assert bad.stdout.startswith(failed)


def test_bad_input_is_a_one_line_error_and_writes_nothing(home, tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    assert folk("import", str(folder), "--name", "real").returncode == 0
    before = snapshot(home)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    cases = [
        (("import", str(folder), "--name", "../escape"), "contains '/'"),
        (("import", str(folder), "--name", "nul\x01 x"), "control character"),
        (("import", str(notes)), "not a model"),
        (("show", "real:v9"), "unknown model 'real:v9'; see folk ls"),
        (("rm", "real", "ghost"), "unknown model 'ghost:latest'"),  # all or nothing
    ]
    for (_, words), proc in zip(cases, folk_parallel(*(a for a, _ in cases)), strict=True):
        assert_one_line_error(proc, words)
    assert snapshot(home) == before


@pytest.mark.slow  # many folk subprocesses (import, export, card, transparency)
def test_export_card_transparency(home, bpe_models, tmp_path):
    folder = bpe_models("llama")
    assert folk("import", str(folder), "--name", "bpe", "--license", "mit").returncode == 0
    api.add_evaluation("bpe", "tinyshakespeare", "perplexity", 123.4, n_samples=10)
    hf, gg, card, report = folk_parallel(
        ("export", "bpe", str(tmp_path / "hf"), "--format", "hf", "--json"),
        ("export", "bpe", str(tmp_path / "g"), "--format", "gguf", "--dtype", "f16"),
        ("card", "bpe", "--out", str(tmp_path / "c")),
        ("transparency", "bpe", "--json"),
    )
    assert json.loads(hf.stdout)["path"] == str(tmp_path / "hf")
    weights = (tmp_path / "hf" / "model.safetensors").read_bytes()
    assert weights == (folder / "model.safetensors").read_bytes()
    assert gg.returncode == 0 and gg.stdout.strip().endswith("bpe.gguf")
    from gguf import GGUFReader

    reader = GGUFReader(tmp_path / "g" / "bpe.gguf")
    assert bytes(reader.fields["general.license"].parts[-1]).decode() == "mit"
    assert card.stdout == f"wrote {tmp_path / 'c' / 'README.md'}\n"
    text = (tmp_path / "c" / "README.md").read_text()
    assert text.startswith('---\nlicense: "mit"\n') and "## Lineage" in text
    report = json.loads(report.stdout)
    status = {i["name"]: i["status"] for i in report["indicators"]}
    assert status["Model License"] == "met" and status["Data sources"] == "unknown"
    assert status["Evaluation of capabilities"] == "met"
    assert report["met"] == sum(s == "met" for s in status.values())
    again = folk("card", "bpe", "--out", str(tmp_path / "c"))
    assert_one_line_error(again, "README.md exists; pass --force")


@pytest.mark.slow
def test_bundled_model_is_registered_on_first_use_and_runs_by_name():
    """In the session's FOLK_HOME: the first use registers SmolLM2; `folk run NAME` works."""
    env = {"FOLK_HOME": SESSION_HOME}
    run = folk(
        "run", "smollm2-135m-instruct", "What is the capital of France?", "-n", "12", env=env
    )
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
    shown = json.loads(folk("show", "smollm2-135m-instruct", "--json", env=env).stdout)
    assert shown["license"]["expression"] == "apache-2.0" and shown["operation"] == "import"
    from folklm.hub.defaults import default_gguf_path
    from folklm.hub.store import sha256_file

    gguf = default_gguf_path()
    assert shown["source"]["file"] == gguf.name
    assert shown["source"]["sha256"] == sha256_file(gguf)[0]
    assert shown["license"]["source"] == f"GGUF general.license of {gguf.name}"

"""The shipped data sets: complete, intact, documented, and overridable by the user's copies."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from folklm import datasets
from folklm.errors import FolkError

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "src" / "folklm" / "datasets"


def test_manifest_lists_exactly_the_stored_files_and_every_one_decompresses_intact():
    stored = {
        p.relative_to(PKG).as_posix()
        for p in PKG.rglob("*")
        if p.is_file() and p.suffix in (".xz", ".gz", ".bz2")
    }
    assert stored == {e["stored"] for e in datasets.manifest().values()}
    for name in datasets.names():
        p = datasets.path(name)
        data = p.read_bytes()
        assert len(data) == datasets.manifest()[name]["bytes"], name
        assert hashlib.sha256(data).hexdigest() == datasets.manifest()[name]["sha256"], name


def test_every_set_has_its_source_and_a_licence_that_the_hub_reads():
    from folklm.hub.license_files import data_license

    sets = sorted({n.split("/", 1)[0] for n in datasets.names()})
    assert "arc_easy" in sets and "mmlu" in sets and len(sets) == 15
    for s in sets:
        text = (PKG / s / "SOURCE.md").read_text(encoding="utf-8")
        assert "## As shipped in folklm" in text and "Repository:" in text
    for name in datasets.names():  # the decompressed copy has its SOURCE.md beside it
        assert data_license(datasets.path(name)).ids, name


def test_built_in_tasks_use_only_shipped_files():
    from folklm.eval.builtin import BUILTIN

    for spec in BUILTIN.values():
        for data in (spec.data, spec.fewshot_data):
            if data is not None:
                assert data.startswith(datasets.SCHEME), (spec.name, data)
                datasets.manifest()[data.removeprefix(datasets.SCHEME)]  # noqa: B018


def test_open_text_streams_compressed_names_and_keeps_newlines_on_request():
    first = json.loads(datasets.open_text("gsm8k/test.jsonl").readline())
    assert first["question"].startswith("Janet")
    hh = datasets.open_text("hh_rlhf_harmless_base_test/harmless-base/test.jsonl.gz")
    raw_hh = gzip.open(datasets.path("hh_rlhf_harmless_base_test/harmless-base/test.jsonl.gz"))
    assert hh.readline() == raw_hh.readline().decode()
    hs = datasets.open_text("hellaswag_val_text/hellaswag_val_full.txt.bz2").read()
    assert (
        hs
        == bz2.open(datasets.path("hellaswag_val_text/hellaswag_val_full.txt.bz2")).read().decode()
    )
    crlf = datasets.read_text("wikitext2_raw_test/wiki.test.raw", newline="")
    assert "\r\n" in crlf and "\r" not in datasets.read_text("wikitext2_raw_test/wiki.test.raw")


def test_unknown_name_is_one_line_naming_the_sets():
    with pytest.raises(FolkError, match=r"no shipped data file 'arc_easy/nope.jsonl' \(sets: "):
        datasets.path("arc_easy/nope.jsonl")


def test_cache_is_rewritten_when_damaged_and_a_bad_sha_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("FOLK_HOME", str(tmp_path))
    p = datasets.path("arc_easy/arc_easy.jsonl")
    assert p.is_relative_to(tmp_path) and (p.parent / "SOURCE.md").is_file()
    p.write_text("truncated")
    assert datasets.path("arc_easy/arc_easy.jsonl").read_bytes()[:12] == b'{"choices": '
    entry = dict(datasets.manifest()["openbookqa/openbook_qa.jsonl"], sha256="0" * 64)
    monkeypatch.setitem(datasets.manifest(), "openbookqa/openbook_qa.jsonl", entry)
    with pytest.raises(FolkError, match="does not match MANIFEST.json's sha256"):
        datasets.path("openbookqa/openbook_qa.jsonl")
    assert [f.name for f in p.parent.parent.joinpath("openbookqa").iterdir()] == ["SOURCE.md"]


def test_user_data_dir_comes_first_and_falls_back_to_shipped(monkeypatch, tmp_path):
    from folklm.eval.builtin import resolve_tasks
    from folklm.eval.runner import build_requests

    mine = tmp_path / "data" / "arc_easy"
    mine.mkdir(parents=True)
    rec = {"query": "Question: Is this my own copy?", "choices": ["yes", "no"], "gold": 0}
    (mine / "arc_easy.jsonl").write_text(json.dumps(rec) + "\n")
    monkeypatch.delenv("FOLK_DATA", raising=False)
    datasets.set_data_dir(tmp_path / "data")
    try:
        assert os.environ["FOLK_DATA"] == str((tmp_path / "data").resolve())
        assert datasets.path("arc_easy/arc_easy.jsonl") == mine / "arc_easy.jsonl"
        records, items = build_requests(resolve_tasks("arc_easy")[0], limit=5)
        assert len(items) == 1 and items[0]["requests"][0][0].startswith("Question: Is this my")
        # a file the folder lacks still comes from the shipped copy
        assert datasets.path("boolq/boolq.jsonl").stat().st_size > 2_000_000
    finally:
        datasets.set_data_dir(None)
    with pytest.raises(FolkError, match="--data-dir .*: no such folder"):
        datasets.set_data_dir(tmp_path / "absent")


def test_folk_eval_data_dir_is_read_before_the_model_loads(tmp_path):
    bad = tmp_path / "d" / "arc_easy"
    bad.mkdir(parents=True)
    (bad / "arc_easy.jsonl").write_text("{not json\n")
    proc = subprocess.run(
        [sys.executable, "-m", "folklm.cli.main", "eval", "--tasks", "arc_easy"]
        + ["--data-dir", str(tmp_path / "d"), "--no-store"],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "FOLK_DATA"},
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(bad / "arc_easy.jsonl") in proc.stderr and "not valid JSON" in proc.stderr


def test_python_m_folklm_datasets_path_prints_a_readable_file():
    proc = subprocess.run(
        [sys.executable, "-m", "folklm.datasets", "path", "tinyshakespeare/input.txt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).read_text().startswith("First Citizen:")


def test_nothing_reads_a_folder_beside_the_checkout():
    """The project rule: no run-time or test path into ``../shared``."""
    needles = ('"shared" / "data"', "shared/data", "parents[4]")
    offenders = []
    for folder in ("src", "tests", "bench", "scripts"):
        for p in (ROOT / folder).rglob("*.py"):
            if p == Path(__file__).resolve():
                continue
            text = p.read_text(encoding="utf-8")
            offenders += [f"{p.relative_to(ROOT)}: {n}" for n in needles if n in text]
    assert not offenders, offenders

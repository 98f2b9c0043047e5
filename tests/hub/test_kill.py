"""Crash safety: an import killed with SIGKILL at a random moment leaves the hub consistent.

Each run imports a model with new weights (so a new blob is written every time) in a real
process, which is killed at a random point of the import; the catalogue must then pass
``verify`` and list either the complete entry or nothing.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter

import pytest
from hubtest import IMPORTER, folk, variant

from folklm.hub import api
from folklm.hub.store import sha256_file

KILLS = 24


def start(script, folder, name):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(folder), name],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "go", proc.stderr.read()
    return proc


@pytest.mark.filterwarnings("ignore:no licence found")
def test_import_killed_at_random_points_leaves_no_half_entry(home, tiny_models, tmp_path):
    _, base = tiny_models("llama")
    script = tmp_path / "importer.py"
    script.write_text(IMPORTER)
    # How long an import takes once the interpreter is up: kills land inside that window.
    durations = []
    for i in range(3):
        proc = start(script, variant(base, tmp_path / f"c{i}", i), f"calibrate{i}")
        t0 = time.perf_counter()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        durations.append(time.perf_counter() - t0)
    window = statistics.median(durations)
    rng = random.Random(20261128)
    outcomes: Counter = Counter()
    for i in range(KILLS):
        folder = variant(base, tmp_path / f"k{i}", 100 + i)
        proc = start(script, folder, f"k{i}")
        time.sleep(rng.uniform(0, window * 1.1))
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
        report = api.verify()
        assert report["problems"] == [] and report["catalogue"] == "ok", report
        names = {r["name"] for r in api.list_models()}
        if f"k{i}:latest" in names:
            entry = api.show(f"k{i}")
            assert {f["path"]: f["sha256"] for f in entry.files} == {
                p.name: sha256_file(p)[0] for p in folder.iterdir()
            }
            assert (api.resolve_model(f"k{i}") / "model.safetensors").is_file()
            outcomes["complete"] += 1
        else:
            outcomes["orphan blobs" if report["unreferenced"] else "nothing written"] += 1
    print(f"import window {window * 1000:.0f} ms; outcomes after {KILLS} kills: {dict(outcomes)}")
    assert outcomes["complete"] < KILLS  # some kills did land inside the import
    # What a user sees afterwards, through the real CLI.
    verify = folk("verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    listed = json.loads(folk("ls", "--json").stdout)
    assert len(listed) == outcomes["complete"] + 3
    for row in listed:
        assert len(api.show(row["name"]).files) == len(list(base.iterdir()))
    shown = json.loads(folk("show", listed[-1]["name"], "--json").stdout)
    assert shown["files"] == api.show(listed[-1]["name"]).files
    # Leftovers of the killed imports are collected; the hub keeps working.
    folk("gc")
    assert api.verify()["unreferenced"] == 0
    proc = start(script, variant(base, tmp_path / "after", 999), "after")
    assert proc.wait(timeout=60) == 0
    assert api.verify()["problems"] == []

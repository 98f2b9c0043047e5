"""``folk eval`` as a user runs it: a subprocess, a user task from YAML + JSONL, the hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SPEC = str(HERE / "data/tiny_mc.yaml")


def folk(*args: str, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "folklm.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def one_line_error(proc, *words: str) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("folk: error:"), proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_user_task_from_yaml_runs_and_is_stored_on_the_card(tiny_models, tmp_path):
    """No Python: a spec and a JSONL file; results in the hub, the card and --compare."""
    import folklm
    from folklm.eval.builtin import resolve_tasks
    from folklm.eval.runner import evaluate

    env = {"FOLK_HOME": str(tmp_path / "home")}
    for family, name in (("llama", "tiny-a"), ("qwen2", "tiny-b")):
        _, folder = tiny_models(family)
        proc = folk("import", str(folder), "--name", name, "--license", "apache-2.0", env=env)
        assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    proc = folk("eval", "tiny-a", "--tasks", SPEC, "--json", "--output", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    task = res["results"]["tiny_mc"]
    assert task["n"] == 12 and set(task["metrics"]) == {"acc", "acc_norm"}
    assert 0 <= task["metrics"]["acc"] <= 1 and task["stderr"]["acc"] is not None
    # the same numbers as the library call on the same model
    ref = evaluate(folklm.load(tiny_models("llama")[1], dtype="float32"), resolve_tasks(SPEC))
    assert task["metrics"] == ref["results"]["tiny_mc"]["metrics"]
    saved = json.loads(Path(res["results_file"]).read_text())
    assert saved["results"]["tiny_mc"]["metrics"] == task["metrics"]
    assert Path(res["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["stored_in_hub"] == "tiny-a"

    card = folk("card", "tiny-a", env=env)
    assert card.returncode == 0, card.stderr
    front = card.stdout.split("---")[1]
    assert "model-index:" in front and '"tiny_mc"' in front and '"acc_norm"' in front

    proc = folk("eval", "tiny-b", "--tasks", SPEC, "--json", "--output", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    b = json.loads(proc.stdout)["results"]["tiny_mc"]["metrics"]
    cmp = folk("eval", "--compare", "tiny-a", "tiny-b", "--json", env=env)
    assert cmp.returncode == 0, cmp.stderr
    rows = {r["metric"]: r for r in json.loads(cmp.stdout)["rows"]}
    assert rows["acc"]["a"] == task["metrics"]["acc"] and rows["acc"]["b"] == b["acc"]
    assert rows["acc"]["diff"] == pytest.approx(b["acc"] - task["metrics"]["acc"])


def test_bad_input_gives_one_line_errors(tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    line = one_line_error(folk("eval", str(folder), "--tasks", "hellaswag,nope"), "'nope'")
    assert "hellaswag" in line and "winogrande" in line  # the known tasks are listed
    # --limit 0 and malformed specs: test_tasks.py (the same FolkError, printed by main())
    rows = [
        {"question": "t5", "options": ["t6", "t7"], "answer": 1},
        {"question": "t8", "options": ["t9", "t10"], "answer": 0},
        {"question": "t11", "options": ["t12", "t13"]},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tmp_path / "s.yaml"
    spec.write_text(Path(SPEC).read_text().replace("tiny_mc.jsonl", "d.jsonl"))
    out = tmp_path / "out"
    one_line_error(
        folk("eval", str(folder), "--tasks", str(spec), "--output", str(out)),
        "d.jsonl record 2",
        "'gold'",
    )
    assert not out.exists()  # nothing half-written

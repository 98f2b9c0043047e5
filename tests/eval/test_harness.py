"""folklm inside lm-evaluation-harness: the ``folklm`` model type, and the harness's own
task machinery (its shipped arc_easy YAML over our data) agreeing with ``folk eval`` and
with its HF backend. Prompt equality for every built-in task: test_lm_eval_prompts.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture
def harness_task(tmp_path) -> Path:
    """The harness's task YAML for tests/eval/data/tiny_mc.jsonl, its data path absolute."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    paths = {"../data/tiny_mc.jsonl": str(HERE / "data/tiny_mc.jsonl")}
    for src in (HERE / "lm_eval_tasks").glob("*.yaml"):
        text = src.read_text()
        for a, b in paths.items():
            text = text.replace(a, b)
        (folder / src.name).write_text(text)
    return folder


def _run(model: str, model_args: str, task, task_dir: Path, limit=None) -> list[dict]:
    """simple_evaluate's (results, samples sorted by doc) for one task (a name or a Task)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
        batch_size=4,
        device="cpu",
        limit=limit,
    )
    name = task if isinstance(task, str) else task.config.task
    return out["results"][name], sorted(out["samples"][name], key=lambda s: s["doc_id"])


def test_folklm_model_type_gives_folk_eval_numbers(tiny_models, harness_task):
    """The harness's own task code over our JSONL, scored by ``--model folklm``, equals
    ``folk eval`` with our YAML spec of the same task: prompts, scores and metrics."""
    import lm_eval.api.registry as registry

    import folklm
    from folklm.eval.builtin import resolve_tasks
    from folklm.eval.harness import FolkLM
    from folklm.eval.runner import build_requests, evaluate

    assert registry.get_model("folklm") is FolkLM
    assert registry.get_model("hf").__name__ == "HFLM"  # the built-in models still load
    _, folder = tiny_models("llama")
    res, samples = _run("folklm", f"model={folder}", "tiny_mc_harness", harness_task)
    (spec,) = resolve_tasks(str(HERE / "data/tiny_mc.yaml"))
    folk = evaluate(folklm.load(folder, dtype="float32"), [spec], keep_items=True)["results"][
        "tiny_mc"
    ]
    _, items = build_requests(spec)
    for metric in ("acc", "acc_norm"):
        assert res[f"{metric},none"] == folk["metrics"][metric]
        assert res[f"{metric}_stderr,none"] == pytest.approx(folk["stderr"][metric])
    for sample, item, scored in zip(samples, items, folk["items"], strict=True):
        assert [tuple(a) for a in sample["arguments"]] == item["requests"]
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(scored["ll"], abs=1e-5)


@pytest.mark.slow
def test_harness_task_on_local_arc_easy_folklm_vs_hf_backend(harness_task):
    """Default model, fp32: lm-eval's own arc_easy task (its shipped YAML) over our data
    gives folk eval's requests, and --model folklm and --model hf agree per item (1e-3)."""
    from lmeval_tasks import harness_task as lm_eval_task

    from folklm.eval.builtin import resolve_tasks
    from folklm.eval.runner import build_requests
    from folklm.hub.defaults import default_model_folder

    folder = default_model_folder()
    n = 3
    arc = lm_eval_task("arc_easy")
    ours, s_ours = _run("folklm", f"model={folder}", arc, harness_task, n)
    hf, s_hf = _run(
        "hf", f"pretrained={folder},dtype=float32", lm_eval_task("arc_easy"), harness_task, n
    )
    _, items = build_requests(resolve_tasks("arc_easy")[0], limit=n)
    for a, b, item in zip(s_ours, s_hf, items, strict=True):
        assert [tuple(x) for x in a["arguments"]] == item["requests"]
        assert a["arguments"] == b["arguments"]
        lls_a = [r[0] for r in a["filtered_resps"]]
        lls_b = [r[0] for r in b["filtered_resps"]]
        assert lls_a == pytest.approx(lls_b, abs=1e-3)
    assert ours["acc,none"] == hf["acc,none"] and ours["acc_norm,none"] == hf["acc_norm,none"]


def test_rolling_and_generation_requests(tiny_models):
    from lm_eval.api.instance import Instance

    from folklm.eval.harness import FolkLM

    _, folder = tiny_models("llama")
    lm = FolkLM(model=str(folder), batch_size=2)
    texts = ["t5 t6 t7 t8 t9", "t10 t11"]
    rolling = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    )
    # a document's log-likelihood = the empty-context log-likelihood of its text
    direct = lm.loglikelihood(
        [Instance("loglikelihood", {}, ("", t), i) for i, t in enumerate(texts)]
    )
    assert rolling == pytest.approx([d[0] for d in direct], abs=1e-5)
    gens = lm.generate_until(
        [Instance("generate_until", {}, ("t5 t6", {"until": ["t50"], "max_gen_toks": 5}), 0)]
    )
    assert isinstance(gens[0], str) and "t50" not in gens[0] and len(gens[0].split()) <= 5


def test_lm_eval_command_line_with_folklm(tiny_models, harness_task, tmp_path):
    _, folder = tiny_models("llama")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "folklm.eval.harness",
            "--model",
            "folklm",
            "--model_args",
            f"model={folder}",
            "--tasks",
            "tiny_mc_harness",
            "--include_path",
            str(harness_task),
            "--output_path",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiny_mc_harness" in proc.stdout and "acc_norm" in proc.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))

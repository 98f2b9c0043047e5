"""lm-evaluation-harness's ``local-completions`` model scores a log-likelihood task
(ARC-Easy, the first items of the shipped copy) against ``folk serve``, and gets the same
per-choice log-likelihoods and accuracy as lm-eval's own ``hf`` (transformers) backend on
the same model folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from folklm import datasets

ARC = datasets.path("arc_easy/arc_easy.jsonl")
LIMIT = 24

TASK = """task: folk_arc_easy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""


def evaluate(model: str, model_args: str, include: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["folk_arc_easy"],
        limit=LIMIT,
        task_manager=TaskManager(include_path=str(include)),
        log_samples=True,
        batch_size=8,
    )


def loglikelihoods(result: dict) -> list[float]:
    samples = sorted(result["samples"]["folk_arc_easy"], key=lambda s: s["doc_id"])
    return [float(r[0]) for s in samples for r in s["filtered_resps"]]


@pytest.mark.slow
def test_local_completions_arc_easy(default_server, tmp_path):
    from folklm.hub.defaults import default_model_folder

    folder = default_model_folder()
    (tmp_path / "folk_arc_easy.yaml").write_text(TASK.format(path=ARC))
    served = evaluate(
        "local-completions",
        f"base_url={default_server.url}/v1/completions,model=smollm2,"
        f"tokenizer_backend=huggingface,tokenizer={folder},num_concurrent=1,max_retries=1",
        tmp_path,
    )
    reference = evaluate("hf", f"pretrained={folder},dtype=float32,device=cpu", tmp_path)
    acc = served["results"]["folk_arc_easy"]["acc,none"]
    assert acc == reference["results"]["folk_arc_easy"]["acc,none"]
    assert acc > 0.25  # better than chance on 4 choices
    print(f"lm-eval local-completions vs hf, arc_easy first {LIMIT}: acc {acc:.4f}")
    ours, theirs = loglikelihoods(served), loglikelihoods(reference)
    assert len(ours) == len(theirs) >= 4 * LIMIT - 4
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 2e-3

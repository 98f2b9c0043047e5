"""Task specs, prompt formats, few-shot, metrics and answer extraction (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from folklm import datasets
from folklm.errors import FolkError
from folklm.eval import metrics as M
from folklm.eval.builtin import GROUPS, known_tasks, resolve_tasks
from folklm.eval.runner import build_requests
from folklm.eval.tasks import load_spec

HERE = Path(__file__).resolve().parent


def _first(task: str, **kw):
    (spec,) = resolve_tasks(task)
    return build_requests(spec, limit=kw.pop("limit", 1), **kw)[1]


def test_prompt_formats_follow_the_harness():
    (arc,) = _first("arc_easy")
    ctx, cont = arc["requests"][0]
    assert ctx.startswith("Question: Which statement") and ctx.endswith("\nAnswer:")
    assert cont == " Sunlight is the source of energy for nearly all ecosystems."
    (hs,) = _first("hellaswag")  # ctx_b capitalised, as the harness's process_docs does
    assert hs["requests"][0] == (
        "Roof shingle removal: A man is sitting on a roof. He",
        " is using wrap to wrap a pair of skis.",
    )
    assert hs["gold"] == 3
    (wg,) = _first("winogrande")  # partial scoring: the option is in the context
    assert wg["requests"] == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    (bq,) = _first("boolq")
    assert not bq["requests"][0][0].startswith("Passage:")
    assert bq["requests"][0][0].endswith("?\nAnswer:")
    assert [c for _, c in bq["requests"]] == [" no", " yes"]
    (mm,) = _first("mmlu_anatomy")
    ctx = mm["requests"][0][0]
    assert ctx.startswith(
        "The following are multiple choice questions (with answers) about "
        "anatomy.\n\nA lesion causing"
    )
    assert "\nA. paralysis of the facial muscles.\nB. " in ctx and ctx.endswith("\nAnswer:")
    assert [c for _, c in mm["requests"]] == [" A", " B", " C", " D"]
    (lb,) = _first("lambada_openai")
    assert lb["requests"][0][1] == " signs" and not lb["requests"][0][0].endswith(" ")


def test_gsm8k_fewshot_is_seeded_and_never_the_item_itself():
    a = _first("gsm8k", limit=3)
    b = _first("gsm8k", limit=3)
    c = _first("gsm8k", limit=3, seed=7)
    assert [x["context"] for x in a] == [x["context"] for x in b]
    assert [x["context"] for x in a] != [x["context"] for x in c]
    ctx = a[0]["context"]
    assert ctx.count("Question: ") == 6 and ctx.count("#### ") == 5
    assert ctx.endswith("\nAnswer:") and "\n\nQuestion: Janet" in ctx


def test_mmlu_group_and_zero_shot_first_n():
    assert len(GROUPS["mmlu"]) == 57 and len(resolve_tasks("mmlu")) == 57
    (mm,) = _first("mmlu_anatomy", shots=2)
    dev = datasets.read_text("mmlu/dev/anatomy_dev.csv").splitlines()[0]
    assert dev.split(",")[0] in mm["requests"][0][0]  # first_n: the first dev question


def test_gsm8k_extraction_matches_the_harness_on_every_gold_answer():
    """lm-eval's own RegexFilter and exact_match on the reference solutions: 100 %."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    (spec,) = resolve_tasks("gsm8k")
    answers = [json.loads(x)["answer"] for x in datasets.open_text("gsm8k/test.jsonl")]
    assert len(answers) == 1319
    for f in spec.filters:
        ref = RegexFilter(f.regex, f.group_select, f.fallback).apply([[a] for a in answers], [])
        ours = [M.regex_extract(a, f.regex, f.group_select, f.fallback) for a in answers]
        assert ours == [r[0] for r in ref]
        if f.name == "strict-match":
            scores = [
                M.exact_match(o, a, spec.regexes_to_ignore, True)
                for o, a in zip(ours, answers, strict=True)
            ]
            assert sum(scores) == len(answers)  # 100 % on the gold answers
            theirs = exact_match_hf_evaluate(ours, answers, spec.regexes_to_ignore, True)
            assert theirs["exact_match"] == 1.0


def test_stderr_formulas_are_the_harness_ones():
    from lm_eval.api.metrics import mean_stderr, pooled_sample_stderr

    xs = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert M.mean_stderr(xs) == pytest.approx(mean_stderr(xs))
    assert M.pooled_stderr([0.1, 0.05], [10, 40]) == pytest.approx(
        pooled_sample_stderr([0.1, 0.05], [10, 40])
    )


def test_user_yaml_spec_loads_with_paths_relative_to_it():
    spec = load_spec(HERE / "data/tiny_mc.yaml")
    assert spec.name == "tiny_mc" and Path(spec.data) == HERE / "data/tiny_mc.jsonl"
    _, items = build_requests(spec, limit=2)
    assert items[0]["requests"][0] == ("t3 t124 t22 t53 t86 t4", " t12")


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(FolkError, match="unknown task 'helaswag'; known: arc_challenge"):
        resolve_tasks("helaswag")
    assert "hellaswag" in known_tasks()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"kind": "essay"}, "field 'kind' must be one of"),
        ({"colour": "red"}, "unknown field 'colour'"),
        ({"gold": None}, "field 'gold'"),
        ({"num_fewshot": -1}, "field 'num_fewshot'"),
        ({"metrics": ["bleu"]}, "field 'metrics'"),
        ({"text": "{{ question "}, "bad template"),
    ],
)
def test_malformed_spec_names_the_field(tmp_path, patch, message):
    import yaml

    raw = yaml.safe_load((HERE / "data/tiny_mc.yaml").read_text())
    raw.update(patch)
    raw = {k: v for k, v in raw.items() if v is not None}
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(raw))
    with pytest.raises(FolkError, match=message) as e:
        load_spec(spec)
    assert str(spec) in str(e.value) and "\n" not in str(e.value)


def test_missing_answer_field_names_the_record(tmp_path):
    rows = [
        {"question": "t5", "options": ["t6", "t7"], "answer": 0},
        {"question": "t8", "options": ["t9", "t10"]},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "s.yaml").write_text(
        (HERE / "data/tiny_mc.yaml").read_text().replace("tiny_mc.jsonl", "d.jsonl")
    )
    with pytest.raises(FolkError, match=r"d.jsonl record 1: missing field for 'gold'.*answer"):
        build_requests(load_spec(tmp_path / "s.yaml"))


def test_limit_zero_is_refused():
    (spec,) = resolve_tasks("arc_easy")
    with pytest.raises(FolkError, match="--limit must be >= 1, got 0"):
        build_requests(spec, limit=0)


def test_chat_template_wraps_the_prompt_and_drops_the_delimiter():
    """As the harness with apply_chat_template: the options follow the assistant turn."""
    (spec,) = resolve_tasks("arc_easy")
    _, items = build_requests(spec, limit=1, chat_template=lambda s: f"<user>{s}</user>")
    ctx, cont = items[0]["requests"][0]
    assert ctx.startswith("<user>Question: ") and ctx.endswith("\nAnswer:</user>")
    assert cont == "Sunlight is the source of energy for nearly all ecosystems."


# -- specs that cannot silently mislead ----------------------------------------------------
PIQA_LIKE = [
    {
        "goal": "To dry wet shoes,",
        "sol1": "stuff them with paper.",
        "sol2": "freeze them.",
        "label": 0,
    },
    {"goal": "To cut bread,", "sol1": "use a spoon.", "sol2": "use a serrated knife.", "label": 1},
    {"goal": "To cool tea,", "sol1": "add an ice cube.", "sol2": "heat it.", "label": 0},
]


def _piqa_spec(tmp_path, choices: str, text: str = "Question: {{goal}}\\nAnswer:", records=None):
    data = tmp_path / "piqa_like.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records or PIQA_LIKE))
    spec = tmp_path / "piqa_like.yaml"
    spec.write_text(
        f'name: piqa_like\nkind: multiple_choice\ndata: piqa_like.jsonl\ntext: "{text}"\n'
        f"choices: {choices}\ngold: label\n"
    )
    return spec


def test_the_expression_form_gives_each_record_its_own_options(tmp_path, recwarn):
    spec = load_spec(_piqa_spec(tmp_path, "'{{[sol1, sol2]}}'"))
    _, items = build_requests(spec)
    assert [c for _, c in items[1]["requests"]] == [" use a spoon.", " use a serrated knife."]
    assert items[1]["gold"] == 1 and not [w for w in recwarn if "piqa" in str(w.message)]


def test_a_literal_list_that_looks_like_a_template_is_refused(tmp_path):
    with pytest.raises(FolkError) as e:
        load_spec(_piqa_spec(tmp_path, '["{{sol1}}", "{{sol2}}"]'))
    msg = str(e.value)
    assert "\n" not in msg and "piqa_like.yaml: field 'choices' is a list" in msg
    assert "'{{sol1}}' looks like a template" in msg and 'choices: "{{[sol1, sol2]}}"' in msg


def test_identical_options_for_every_record_warn_in_one_line(tmp_path):
    from folklm.eval.tasks import TaskWarning

    spec = load_spec(_piqa_spec(tmp_path, "\"{{['sol1', 'sol2']}}\""))  # quoted: literals
    with pytest.warns(TaskWarning) as caught:
        build_requests(spec)
    (w,) = [str(x.message) for x in caught]
    assert "\n" not in w and "all 3 records got the same options ['sol1', 'sol2']" in w
    with pytest.warns(TaskWarning, match="all 3 records got the same prompt 'goal'"):
        build_requests(load_spec(_piqa_spec(tmp_path, "'{{[sol1, sol2]}}'", text="goal")))


def test_a_template_that_renders_empty_is_refused(tmp_path):
    records = [dict(r) for r in PIQA_LIKE]
    records[2]["goal"] = " "
    spec = load_spec(_piqa_spec(tmp_path, "'{{[sol1, sol2]}}'", text="{{goal}}", records=records))
    with pytest.raises(FolkError, match=r"record 2: field 'text' renders empty \(template"):
        build_requests(spec)
    records[2]["goal"], records[1]["sol2"] = "To cool tea,", ""
    spec = load_spec(_piqa_spec(tmp_path, "'{{[sol1, sol2]}}'", records=records))
    with pytest.raises(FolkError, match=r"record 1: option 1 of 'choices' renders empty"):
        build_requests(spec)


def test_folk_eval_prints_the_warning_as_one_line_before_loading_the_model(tmp_path):
    import os
    import subprocess
    import sys

    spec = _piqa_spec(tmp_path, "\"{{['sol1', 'sol2']}}\"")
    proc = subprocess.run(
        [sys.executable, "-m", "folklm.cli.main", "eval", str(tmp_path / "no-model")]
        + ["--tasks", str(spec), "--no-store"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("folk: warning: task ") and "same options" in lines[0]
    assert lines[1].startswith("folk: error:") and len(lines) == 2, lines


def test_gsm8k_shots_are_drawn_as_lm_eval_draws_them_from_another_split():
    """lm-eval's ContextSampler with no eval_doc (train != test): exactly 5 per record."""
    from lm_eval.api.samplers import ContextSampler

    train = [json.loads(line) for line in datasets.open_text("gsm8k/train.jsonl")]
    sampler = ContextSampler(train, rnd=1234)
    for item in _first("gsm8k", limit=4):
        shots = sampler.sample(5, eval_doc=None)
        want = "".join(f"Question: {d['question']}\nAnswer: {d['answer']}\n\n" for d in shots)
        assert item["context"].startswith(want)


def test_a_template_cannot_reorder_the_choices(tmp_path):
    """Issue 16, finding 11: under the mutable sandbox, a ``text`` template could call
    ``choices.reverse()`` and move the gold answer; the immutable sandbox refuses it."""
    records = [dict(r, opts=[r["sol1"], r["sol2"]]) for r in PIQA_LIKE]
    spec = load_spec(
        _piqa_spec(tmp_path, "'{{opts}}'", text="{{opts.reverse() or goal}}", records=records)
    )
    with pytest.raises(FolkError, match="unsafe|not safely callable|reverse"):
        build_requests(spec)
    _, items = build_requests(load_spec(_piqa_spec(tmp_path, "'{{opts}}'", records=records)))
    assert [c for _, c in items[1]["requests"]] == [
        " " + PIQA_LIKE[1]["sol1"],
        " " + PIQA_LIKE[1]["sol2"],
    ]

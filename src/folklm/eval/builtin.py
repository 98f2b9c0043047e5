"""The built-in tasks over the shipped data (``folklm.datasets``), in lm-eval's prompt format.

Each spec cites the harness task it follows (``lm_eval/tasks/<task>/*.yaml``, v0.4). The
data files are re-formatted copies (see each data set's SOURCE.md), so the templates
read their field names; the prompt text is the harness's. ``data: builtin:<set>/<file>``
is resolved when the records are read (``$FOLK_DATA`` first, then the shipped copy).
"""

from __future__ import annotations

import os

from folklm.datasets import SCHEME
from folklm.errors import FolkError
from folklm.eval.tasks import Filter, TaskSpec, load_spec

MMLU_SUBJECTS = """abstract_algebra anatomy astronomy business_ethics clinical_knowledge
college_biology college_chemistry college_computer_science college_mathematics college_medicine
college_physics computer_security conceptual_physics econometrics electrical_engineering
elementary_mathematics formal_logic global_facts high_school_biology high_school_chemistry
high_school_computer_science high_school_european_history high_school_geography
high_school_government_and_politics high_school_macroeconomics high_school_mathematics
high_school_microeconomics high_school_physics high_school_psychology high_school_statistics
high_school_us_history high_school_world_history human_aging human_sexuality international_law
jurisprudence logical_fallacies machine_learning management marketing medical_genetics
miscellaneous moral_disputes moral_scenarios nutrition philosophy prehistory
professional_accounting professional_law professional_medicine professional_psychology
public_relations security_studies sociology us_foreign_policy virology world_religions""".split()


def _d(rel: str) -> str:
    return SCHEME + rel


def _arc(name: str) -> TaskSpec:  # lm_eval/tasks/arc/arc_easy.yaml
    return TaskSpec(
        name=name,
        kind="multiple_choice",
        data=_d(f"{name}/{name}.jsonl"),
        text="{{query}}\nAnswer:",  # the files' query already reads "Question: ..."
        choices="choices",
        gold="gold",
        split="test",
    )


def _mmlu(subject: str) -> TaskSpec:  # lm_eval/tasks/mmlu/default/_default_template_yaml
    options = "".join(f"\n{L}. {{{{choices[{i}]}}}}" for i, L in enumerate("ABCD"))
    return TaskSpec(
        name=f"mmlu_{subject}",
        kind="multiple_choice",
        data=_d(f"mmlu/test/{subject}_test.csv"),
        format="mmlu_csv",
        description="The following are multiple choice questions (with answers) about "
        f"{subject.replace('_', ' ')}.\n\n",
        text="{{question.strip()}}" + options + "\nAnswer:",
        choices=["A", "B", "C", "D"],
        gold="answer",
        fewshot_data=_d(f"mmlu/dev/{subject}_dev.csv"),
        fewshot_sampler="first_n",
        metrics=["acc"],
        split="test",
        group="mmlu",
    )


def _builtin() -> dict[str, TaskSpec]:
    specs = [
        TaskSpec(  # lm_eval/tasks/hellaswag/hellaswag.yaml (+ utils.process_docs)
            name="hellaswag",
            kind="multiple_choice",
            data=_d("hellaswag_val_text/hellaswag_val_full.txt.bz2"),
            format="hellaswag_txt",
            preprocess="hellaswag",
            text="{{query}}",
            choices="choices",
            gold="label",
            split="validation",
        ),
        _arc("arc_easy"),
        _arc("arc_challenge"),
        TaskSpec(  # lm_eval/tasks/winogrande/default.yaml: partial scoring
            name="winogrande",
            kind="multiple_choice",
            data=_d("winogrande/winogrande.jsonl"),
            contexts="context_options",
            target="continuation",
            gold="gold",
            metrics=["acc"],
            split="validation",
        ),
        TaskSpec(  # lm_eval/tasks/super_glue/boolq/default.yaml
            name="boolq",
            kind="multiple_choice",
            data=_d("boolq/boolq.jsonl"),
            preprocess="boolq",
            text="{{query}}\nAnswer:",
            choices=["no", "yes"],
            gold="gold",
            metrics=["acc"],
            split="validation",
        ),
        TaskSpec(  # lm_eval/tasks/openbookqa/openbookqa.yaml
            name="openbookqa",
            kind="multiple_choice",
            data=_d("openbookqa/openbook_qa.jsonl"),
            text="{{query}}",
            choices="choices",
            gold="gold",
            split="test",
        ),
        TaskSpec(  # lm_eval/tasks/lambada/lambada_openai.yaml
            name="lambada_openai",
            kind="loglikelihood",
            data=_d("lambada_openai/lambada_openai.jsonl"),
            text="{{context}}",
            target="{{' ' + continuation}}",
            split="test",
        ),
        TaskSpec(  # lm_eval/tasks/gsm8k/gsm8k.yaml
            name="gsm8k",
            kind="generate",
            data=_d("gsm8k/test.jsonl"),
            text="Question: {{question}}\nAnswer:",
            target="{{answer}}",
            num_fewshot=5,
            fewshot_data=_d("gsm8k/train.jsonl"),
            until=["Question:", "</s>", "<|im_end|>"],
            filters=[
                Filter("strict-match", r"#### (\-?[0-9\.\,]+)"),
                Filter("flexible-extract", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1),
            ],
            regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"],
            ignore_case=True,
            split="test",
        ),
        TaskSpec(  # lm_eval/tasks/wikitext/wikitext.yaml (document-level, detokenized)
            name="wikitext",
            kind="rolling",
            data=_d("wikitext2_raw_test/wiki.test.raw"),
            format="wikitext_raw",
            preprocess="wikitext",
            text="{{text}}",
            split="test",
        ),
        TaskSpec(  # no harness task: documents of >= 4000 characters of the play text
            name="tinyshakespeare",
            kind="rolling",
            data=_d("tinyshakespeare/input.txt"),
            format="text_blocks",
            text="{{text}}",
        ),
    ]
    specs += [_mmlu(s) for s in MMLU_SUBJECTS]
    return {s.name: s for s in specs}


BUILTIN: dict[str, TaskSpec] = _builtin()
GROUPS = {"mmlu": [f"mmlu_{s}" for s in MMLU_SUBJECTS]}


def known_tasks() -> list[str]:
    return sorted([*BUILTIN, *GROUPS])


def resolve_tasks(names: list[str] | str) -> list[TaskSpec]:
    """Task specs for names (built-in tasks, ``mmlu`` for all subjects, or YAML spec paths)."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    out: list[TaskSpec] = []
    for raw in names:
        name = raw.strip()
        if not name:
            raise FolkError("empty task name in --tasks")
        if name.endswith((".yaml", ".yml")) or os.sep in name:
            out.append(load_spec(name))
        elif name in GROUPS:
            out += [BUILTIN[n] for n in GROUPS[name]]
        elif name in BUILTIN:
            out.append(BUILTIN[name])
        else:
            short = [n for n in known_tasks() if not n.startswith("mmlu_")]
            raise FolkError(
                f"unknown task {name!r}; known: {', '.join(short)}, mmlu_<subject> "
                "(57 subjects), or a path to a YAML task spec"
            )
    seen, unique = set(), []
    for s in out:
        if s.name not in seen:
            seen.add(s.name)
            unique.append(s)
    return unique

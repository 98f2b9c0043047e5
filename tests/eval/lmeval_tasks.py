"""lm-eval's own ``ConfigurableTask`` for a built-in task, over our shipped records.

The task YAML is the one lm-eval ships (``lm_eval/tasks/<task>/*.yaml``, read with the
loader lm-eval's TaskManager uses, ``!function`` hooks included); only the data is ours,
put back into the Hugging Face layout that YAML reads (``to_hf`` functions below: field
names only, no prompt text). lm-eval then renders prompts and draws few-shot examples
itself.

The one assumption shared with our reader: llama.cpp's HellaSwag file holds
``ctx_a + " " + ctx_b`` joined, so the split is put back at the last sentence end when a
lower-case fragment follows it (else ``ctx_b`` is taken as empty, as in WikiHow items).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets as hf_datasets
import lm_eval
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml  # what lm-eval's TaskManager reads with

from folklm.eval.builtin import resolve_tasks
from folklm.eval.data import load_records
from folklm.eval.runner import FEWSHOT_SEED

TASKS = Path(lm_eval.__file__).parent / "tasks"


def _arc(r: dict) -> dict:
    labels = list("ABCDE")[: len(r["choices"])]
    return {
        "question": r["query"].removeprefix("Question: "),
        "choices": {"text": r["choices"], "label": labels},
        "answerKey": labels[r["gold"]],
    }


def _hellaswag(r: dict) -> dict:
    label, _, ctx = r["ctx"].partition(": ")
    cut = max(ctx.rfind(". "), ctx.rfind("? "), ctx.rfind("! "))
    ctx_a, ctx_b = (ctx[: cut + 1], ctx[cut + 2 :]) if cut >= 0 else ("", ctx)
    if not ctx_b[:1].islower():  # no lower-case fragment after the sentence: ctx_b is empty
        ctx_a, ctx_b = ctx, ""
    return {
        "activity_label": label,
        "ctx_a": ctx_a,
        "ctx_b": ctx_b,
        "endings": r["endings"],
        "label": str(r["label"]),
    }


def _winogrande(r: dict) -> dict:
    a, b = r["context_options"]
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return {
        "sentence": a[:n] + "_ " + r["continuation"],
        "option1": a[n:],
        "option2": b[n:],
        "answer": str(r["gold"] + 1),
    }


def _boolq(r: dict) -> dict:
    passage, _, question = r["query"].removeprefix("Passage: ").rpartition("\nQuestion: ")
    return {"passage": passage, "question": question.removesuffix("?"), "label": r["gold"]}


def _openbookqa(r: dict) -> dict:
    labels = list("ABCD")
    return {
        "question_stem": r["query"],
        "choices": {"text": r["choices"], "label": labels},
        "answerKey": labels[r["gold"]],
    }


def _lambada(r: dict) -> dict:
    return {"text": r["context"] + " " + r["continuation"]}


# task -> (lm-eval YAML, our task, HF layout of a raw record, raw format/preprocess)
CASES: dict[str, tuple[str, str, Any]] = {
    "arc_easy": ("arc/arc_easy.yaml", "arc_easy", _arc),
    "arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge", _arc),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag", _hellaswag),
    "winogrande": ("winogrande/default.yaml", "winogrande", _winogrande),
    "boolq": ("super_glue/boolq/default.yaml", "boolq", _boolq),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa", _openbookqa),
    "lambada_openai": ("lambada/lambada_openai.yaml", "lambada_openai", _lambada),
    "gsm8k": ("gsm8k/gsm8k.yaml", "gsm8k", dict),
    "mmlu_anatomy": ("mmlu/default/mmlu_anatomy.yaml", "mmlu_anatomy", dict),
    "mmlu_world_religions": (
        "mmlu/default/mmlu_world_religions.yaml",
        "mmlu_world_religions",
        dict,
    ),
    "wikitext": ("wikitext/wikitext.yaml", "wikitext", dict),
}


def _raw(path: str | None, spec) -> list[dict]:
    """The records as read, before our lm-eval ``process_docs`` equivalents."""
    return load_records(path, spec.format, None)


def harness_task(case: str, shots: int | None = None) -> ConfigurableTask:
    """lm-eval's task ``case`` from its own YAML over our records (few-shot seed set)."""
    yaml_rel, ours, to_hf = CASES[case]
    (spec,) = resolve_tasks(ours)
    config = load_yaml(TASKS / yaml_rel)
    splits = {spec.split: [to_hf(r) for r in _raw(spec.data, spec)]}
    if spec.fewshot_data:  # gsm8k: train, mmlu: dev (as named in the YAML)
        few_split = config.get("fewshot_split") or "train"
        splits[few_split] = [to_hf(r) for r in _raw(spec.fewshot_data, spec)]
    if case == "wikitext":  # the harness's document-level set: one "page" per article
        splits = {"test": [{"page": r["page"]} for r in _raw(spec.data, spec)]}
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if config.get(key) not in splits:  # a split we do not ship
            config[key] = None
    if config.get("fewshot_split") is None:
        # we ship one split: shots come from it, the record itself excluded, which is what
        # lm-eval does when that split is both its test_split and its fewshot_split
        config.update(test_split=spec.split, validation_split=None, fewshot_split=spec.split)
    config["custom_dataset"] = lambda **_: hf_datasets.DatasetDict(
        {k: hf_datasets.Dataset.from_list(v) for k, v in splits.items()}
    )
    if shots is not None:
        config["num_fewshot"] = shots
    task = ConfigurableTask(config=config)
    task.set_fewshot_seed(FEWSHOT_SEED)
    return task


def harness_requests(case: str, shots: int | None, limit: int) -> list[tuple]:
    """The arguments of lm-eval's instances, grouped per record: (context, continuation)s."""
    task = harness_task(case, shots)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    out = []
    for doc_id in sorted(by_doc):
        group = sorted(by_doc[doc_id], key=lambda i: i.idx)
        out.append(tuple(tuple(i.args) for i in group))
    return out

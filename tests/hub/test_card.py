"""Model cards (Hugging Face README.md) and the transparency report, from real records."""

from __future__ import annotations

import time

import pytest
import yaml
from hubtest import variant

from folklm import datasets
from folklm.hub import api
from folklm.hub.card import model_card, write_card
from folklm.hub.transparency import INDICATORS, report

ALPACA = datasets.path("alpaca_tiny/alpaca_tiny.json")


def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


@pytest.fixture
def family(home, tiny_models, tmp_path):
    """base (llama3.1) -> tuned on Alpaca (+ two evaluations); base + other -> merge."""
    _, folder = tiny_models("llama")
    api.import_path(folder, "llama-base", license="llama3.1")
    api.register_model(
        variant(folder, tmp_path / "tuned", 1),
        "llama-alpaca",
        api.Derivation(
            "finetune",
            parents=["llama-base"],
            recipe={
                "method": "lora",
                "rank": 8,
                "lr": 2e-4,
                "objective": "causal LM loss",
                "template": "alpaca",
            },
            data_files=[ALPACA],
            seed=3,
            started_at=time.time() - 60,
            compute={"flops": 2.0e13, "energy_kwh": 0.01},
            description="Follows instructions in the Alpaca style; research use only.",
        ),
    )
    api.add_evaluation(
        "llama-alpaca",
        "arc_easy",
        "acc",
        0.31,
        0.0095,
        n_samples=2376,
        dataset=datasets.path("arc_easy/arc_easy.jsonl"),
        config={"num_fewshot": 0},
    )
    api.add_evaluation(
        "llama-alpaca", "inference", "decode_tokens_per_s", 412.0, config={"hardware": "2-core CPU"}
    )
    api.import_path(variant(folder, tmp_path / "other", 2), "llama-other", license="llama3.2")
    api.register_model(
        variant(folder, tmp_path / "m", 3),
        "llama-merge",
        api.Derivation(
            "merge", parents=["llama-base", "llama-other"], recipe={"method": "slerp", "t": 0.5}
        ),
    )
    return folder


def test_card_front_matter_is_hugging_face_metadata(family):
    meta, body = split_card(model_card("llama-alpaca"))
    assert meta["license"] == "other"  # two sets of terms: the weights' and the data's
    assert meta["license_name"] == "llama3.1-and-cc-by-nc-4.0"
    assert meta["license_link"] == "https://www.llama.com/llama3_1/license/"
    assert meta["base_model"] == ["llama-base"] and meta["base_model_relation"] == "finetune"
    assert meta["datasets"] == ["alpaca_tiny.json"]
    assert meta["pipeline_tag"] == "text-generation"
    assert {"folklm", "non-commercial", "finetune"} <= set(meta["tags"])
    [index] = meta["model-index"]
    assert index["name"] == "llama-alpaca:latest"
    results = {r["metrics"][0]["type"]: r for r in index["results"]}
    assert set(results) == {"acc", "decode_tokens_per_s"}  # every stored evaluation
    acc = results["acc"]
    assert acc["metrics"][0]["value"] == 0.31 and acc["dataset"]["name"] == "arc_easy.jsonl"
    assert acc["task"] == {"type": "text-generation", "name": "arc_easy"}
    for section in (
        "## Intended use",
        "## Training data",
        "## Training procedure",
        "## Evaluation",
        "## Limitations",
        "## Licence",
        "## Lineage",
        "## Transparency report",
        "## Files",
    ):
        assert section in body, section
    assert "research use only" in body
    assert '"rank": 8' in body and "- seed: 3" in body  # the recipe, verbatim
    assert "b1e3ff228aa9c61b" in body  # the data file's hash
    assert "no commercial use (CC BY-NC 4.0)" in body
    tree = api.lineage("llama-alpaca")
    assert f"sha256:{tree.content_hash[7:19]}" in body


def test_merge_card_lists_both_parents(family):
    meta, body = split_card(model_card("llama-merge"))
    assert meta["base_model"] == ["llama-base", "llama-other"]
    assert meta["base_model_relation"] == "merge"
    assert meta["license"] == "other" and meta["license_name"] == "llama3.1-and-llama3.2"
    assert "├── llama-base:latest  import" in body and "└── llama-other:latest  import" in body


def test_single_licence_card_and_write(family, tmp_path):
    meta, _ = split_card(model_card("llama-base"))
    assert meta["license"] == "llama3.1" and "base_model" not in meta
    path = write_card("llama-base", tmp_path / "card")
    assert path == tmp_path / "card" / "README.md" and path.read_text() == model_card("llama-base")


def test_transparency_report_scores_what_the_record_shows(family):
    full = report(api.show("llama-alpaca"), api.lineage("llama-alpaca")).to_dict()
    status = {i["name"]: (i["status"], i["evidence"]) for i in full["indicators"]}
    assert (
        full["total"] == len(INDICATORS)
        and full["met"] + full["unmet"] + full["unknown"] == (full["total"])
    )
    for name in (
        "Data size",
        "Data sources",
        "Data license",
        "Data curation",
        "Compute usage",
        "Development duration",
        "Compute hardware",
        "Energy usage",
        "Model objectives",
        "Evaluation of capabilities",
        "External reproducibility of capabilities evaluation",
        "Inference duration evaluation",
        "Model License",
        "Capabilities description",
        "Permitted, restricted, and prohibited uses",
        "Change log",
    ):
        assert status[name][0] == "met", (name, status[name])
    assert status["Carbon emissions"][0] == "unmet"
    assert "cc-by-nc-4.0" in status["Data license"][1]
    assert "non-commercial only" in status["Permitted, restricted, and prohibited uses"][1]
    assert "700 million" in status["Permitted and prohibited users"][1]
    base = report(api.show("llama-base"), api.lineage("llama-base")).to_dict()
    base_status = {i["name"]: i["status"] for i in base["indicators"]}
    assert base_status["Data sources"] == "unknown"  # upstream of an import
    assert base_status["Evaluation of capabilities"] == "unmet"
    assert base["met"] < full["met"]
    assert "Transparency report" in model_card("llama-alpaca")


def test_an_operation_without_data_leaves_the_data_indicators_unknown(family):
    """A merge used no data: its data is its parents', imported with unknown training data;
    the four data indicators are 'unknown' (not 'met'), with that as evidence."""
    rep = report(api.show("llama-merge"), api.lineage("llama-merge")).to_dict()
    status = {i["name"]: (i["status"], i["evidence"]) for i in rep["indicators"]}
    for name in ("Data size", "Data sources", "Data license", "Data curation"):
        state, evidence = status[name]
        assert state == "unknown", (name, state, evidence)
        assert "'merge' used no data" in evidence
        assert "llama-base:latest (import), llama-other:latest (import)" in evidence
        assert "upstream developer" in evidence
    assert rep["unknown"] >= 4 and "| Data size | unknown |" in model_card("llama-merge")

"""Licence rules with real licence texts and the real data sets shipped in folklm.datasets.

The licence texts below are the opening lines of the published agreements (Meta's Llama
2/3/3.1/3.2 community licences, Google's Gemma Terms of Use, the Apache and MIT licences,
Creative Commons' NC 4.0 legal code), which is what a model folder's LICENSE file holds.
"""

from __future__ import annotations

import warnings

import pytest

from folklm import datasets
from folklm.hub import api
from folklm.hub.license_files import data_license, front_matter, model_license
from folklm.hub.licenses import (
    LicenseConflict,
    Terms,
    check_name,
    conflict,
    derive,
    identify_text,
    lookup,
    mentioned,
)

ALPACA = sorted(datasets.path("alpaca_tiny/alpaca_tiny.json").parent.glob("*"))

TEXTS = {
    "llama2": "LLAMA 2 COMMUNITY LICENSE AGREEMENT\nLlama 2 Version Release Date: July 18, 2023\n\n"
    '"Agreement" means the terms and conditions for use, reproduction, distribution and '
    "modification of the Llama Materials set forth herein.",
    "llama3": "META LLAMA 3 COMMUNITY LICENSE AGREEMENT\nMeta Llama 3 Version Release Date: April "
    "18, 2024\n\n\u201cAgreement\u201d means the terms and conditions for use, reproduction, "
    "distribution and modification of the Llama Materials set forth herein.",
    "llama3.1": "LLAMA 3.1 COMMUNITY LICENSE AGREEMENT\nLlama 3.1 Version Release Date: July 23, "
    "2024\n\u201cAgreement\u201d means the terms and conditions for use, reproduction, "
    "distribution and modification of the Llama Materials set forth herein.",
    "llama3.2": "LLAMA 3.2 COMMUNITY LICENSE AGREEMENT\nLlama 3.2 Version Release Date: September "
    "25, 2024\n\n\u201cAgreement\u201d means the terms and conditions for use, reproduction, "
    "distribution and modification of the Llama Materials set forth herein.",
    "gemma": "Gemma Terms of Use\n\nLast modified: February 21, 2024\n\nBy using, reproducing, "
    "modifying, distributing, performing or displaying any portion or element of Gemma, Model "
    "Derivatives including via any Hosted Service, (each as defined below) (collectively, the "
    '"Gemma Services") or otherwise accepting the terms of this Agreement, you agree to be '
    "bound by this Agreement.",
    "apache-2.0": "\n                                 Apache License\n                           "
    "Version 2.0, January 2004\n                        http://www.apache.org/licenses/\n",
    "mit": "MIT License\n\nCopyright (c) 2024 Hugging Face\n\nPermission is hereby granted, "
    "free of charge, to any person obtaining a copy\nof this software and associated documentation "
    'files (the "Software"), to deal',
    "cc-by-nc-4.0": "Attribution-NonCommercial 4.0 International\n\n====\n\nCreative Commons "
    'Corporation ("Creative Commons") is not a law firm and does not provide legal services',
}


@pytest.mark.parametrize("expected", sorted(TEXTS))
def test_licence_texts_are_identified_by_fingerprint(expected):
    lic = identify_text(TEXTS[expected])
    assert lic is not None and lic.id == expected


def test_declared_ids_accept_spdx_and_hugging_face_spellings():
    assert lookup("Apache-2.0").id == "apache-2.0"
    assert lookup("CC BY-NC 4.0").id == "cc-by-nc-4.0"
    assert lookup("llama3.1").id == "llama3.1"
    assert lookup("Llama 3").id == "llama3"
    assert lookup("GPL-3.0-or-later").id == "gpl-3.0"
    assert lookup("bigscience-openrail-m").id == "openrail"
    assert lookup("other") is None and lookup("my-own-licence") is None


def test_model_licence_from_readme_front_matter_and_license_file(tmp_path):
    (tmp_path / "README.md").write_text(
        "---\nlicense: other\nlicense_name: llama3\nlicense_link: LICENSE\ntags:\n- llama\n---\n# x"
    )
    files = {p.name: p for p in tmp_path.iterdir()}
    found = model_license(files, {})
    assert found.ids == ["llama3"] and "README.md" in found.source
    (tmp_path / "README.md").write_text("# no front matter")
    (tmp_path / "LICENSE").write_text(TEXTS["llama3.2"])
    files = {p.name: p for p in tmp_path.iterdir()}
    found = model_license(files, {})
    assert found.ids == ["llama3.2"] and "LICENSE" in found.source
    # GGUF metadata wins: it is what llama.cpp's converter copied from the model card.
    assert model_license(files, {"general.license": "apache-2.0"}).ids == ["apache-2.0"]
    assert front_matter("---\nlicense: mit # a comment\nbase_model:\n- a\n- 'b'\n---\n") == {
        "license": "mit",
        "base_model": ["a", "b"],
    }


def test_data_licences_are_read_from_the_real_source_files():
    alpaca = data_license(datasets.path("alpaca_tiny/alpaca_tiny.json"))
    # torchtune's copy is BSD-3-Clause; the upstream Alpaca data is CC BY-NC 4.0: both apply.
    assert alpaca.ids == ["bsd-3-clause", "cc-by-nc-4.0"]
    assert "SOURCE.md" in alpaca.source and "github.com/pytorch/torchtune" in alpaca.description
    wikitext = data_license(datasets.path("wikitext2_raw_test/wiki.test.raw"))
    assert set(wikitext.ids) >= {"cc-by-sa-3.0", "gfdl"}
    assert data_license(datasets.path("gsm8k/train.jsonl")).ids == ["mit"]
    assert [lic.id for lic in mentioned("Upstream: CC BY-SA 4.0 (AI2 ARC)")] == ["cc-by-sa-4.0"]


def test_conflict_rules():
    by = {
        i: lookup(i)
        for i in (
            "apache-2.0",
            "llama3",
            "llama3.1",
            "llama3.2",
            "gemma",
            "cc-by-sa-4.0",
            "cc-by-nc-4.0",
            "cc-by-nd-4.0",
            "gpl-3.0",
        )
    }
    assert conflict(by["llama3.1"], by["llama3.2"]) is None  # one family
    assert conflict(by["apache-2.0"], by["gemma"]) is None  # permissive joins anything
    assert "own agreement" in conflict(by["gemma"], by["llama3.1"])
    assert "another model family" in conflict(by["llama3"], by["gemma"])
    assert "forbids commercial use" in conflict(by["cc-by-sa-4.0"], by["cc-by-nc-4.0"])
    assert "no derivative works" in conflict(by["cc-by-nd-4.0"], by["apache-2.0"])
    assert conflict(by["cc-by-sa-4.0"], by["gpl-3.0"]) is None  # CC's one-way compatibility


def test_merge_of_incompatible_parents_is_refused_unless_forced():
    parents = [("a:latest", Terms(["llama3.1"])), ("b:latest", Terms(["gemma"]))]
    with pytest.raises(LicenseConflict, match="a:latest .llama3.1. and b:latest .gemma."):
        derive("merge", "llama-merge", parents, [])
    forced = derive("merge", "llama-merge", parents, [], force=True)
    assert forced.ids == ["llama3.1", "gemma"]
    assert any("forced despite a licence conflict" in w for w in forced.warnings)
    ok = derive("merge", "llama-m", [("a", Terms(["llama3.1"])), ("b", Terms(["llama3.2"]))], [])
    assert ok.ids == ["llama3.1", "llama3.2"] and ok.commercial is True and not ok.warnings


def test_naming_clause_of_llama_3():
    assert check_name("llama-3-alpaca", ["llama3"], "finetune") == []
    assert check_name("Llama-3.1-tune", ["llama3.1"], "finetune") == []
    assert check_name("my-tune", ["llama3"], "import") == []  # an import is not a derivative
    [warning] = check_name("my-tune", ["llama3.1"], "quantize")
    assert '"Llama" at the beginning' in warning and "llama-my-tune" in warning


def test_llama3_model_tuned_on_alpaca_is_non_commercial_with_naming_warning(home, tiny_models):
    """The real example: a model imported with --license llama3, then "tuned" on
    folklm.datasets' alpaca_tiny/* (whose SOURCE.md states CC BY-NC 4.0 upstream)."""
    _, folder = tiny_models("llama")
    base = api.import_path(folder, "base-llama:8b", license="llama3")
    assert base.license["expression"] == "llama3" and base.license["commercial"] is True
    with pytest.warns(api.HubWarning, match=r'"Llama 3" at the beginning of its name'):
        tuned = api.register_model(
            folder,
            "alpaca-tune",
            api.Derivation(
                "finetune",
                parents=["base-llama:8b"],
                recipe={"method": "lora", "rank": 8, "lr": 2e-4, "epochs": 1},
                data_files=ALPACA,
                seed=7,
            ),
        )
    lic = tuned.license
    assert lic["expression"] == "llama3 AND cc-by-nc-4.0"
    assert lic["commercial"] is False
    assert any(
        "non-commercial: training data alpaca_tiny.json is licensed CC BY-NC 4.0" in n
        for n in lic["notes"]
    )
    assert "no commercial use (CC BY-NC 4.0)" in lic["obligations"]
    assert 'display "Built with Meta Llama 3"' in lic["obligations"]
    json_file = next(d for d in tuned.data_files if d["name"] == "alpaca_tiny.json")
    assert json_file["sha256"] == (
        "b1e3ff228aa9c61b524f85f859640fd07c0b94895047222dba6deec978afdfc0"  # from SOURCE.md
    )
    assert json_file["license"] == "bsd-3-clause AND cc-by-nc-4.0"
    # Propagation: a quantization of the tune keeps both terms, and the naming clause.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quant = api.register_model(
            folder,
            "llama-3-alpaca-q8",
            api.Derivation("quantize", parents=["alpaca-tune"], recipe={"scheme": "int8"}),
        )
    assert not [w for w in caught if issubclass(w.category, api.HubWarning)]
    assert quant.license["expression"] == "llama3 AND cc-by-nc-4.0"
    assert quant.license["commercial"] is False


def test_caller_can_give_data_licences(home, tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    api.import_path(folder, "base", license="apache-2.0")
    data = tmp_path / "mine.jsonl"  # no SOURCE.md beside it
    data.write_text('{"text": "hello"}\n')
    with pytest.warns(api.HubWarning, match="licence of data file mine.jsonl is unknown"):
        api.register_model(
            folder, "t1", api.Derivation("finetune", parents=["base"], data_files=[data])
        )
    t2 = api.register_model(
        folder,
        "t2",
        api.Derivation(
            "finetune", parents=["base"], data_files=[api.DataFile(data, license="CC-BY-NC-SA-4.0")]
        ),
    )
    assert t2.license["expression"] == "apache-2.0 AND cc-by-nc-sa-4.0"
    assert t2.license["commercial"] is False
    assert t2.data_files[0]["license_source"] == "given by the caller"


def test_refused_merge_writes_nothing(home, tiny_models):
    from hubtest import snapshot

    _, folder = tiny_models("llama")
    api.import_path(folder, "llama-a", license="llama3.1")
    api.import_path(folder, "gemma-b", license="gemma")
    before = snapshot(home)
    with pytest.raises(LicenseConflict, match="each require derivatives"):
        api.register_model(
            folder,
            "llama-merged",
            api.Derivation(
                "merge", parents=["llama-a", "gemma-b"], recipe={"method": "slerp", "t": 0.5}
            ),
        )
    assert snapshot(home) == before
    with pytest.warns(api.HubWarning, match="forced despite a licence conflict"):
        merged = api.register_model(
            folder,
            "llama-merged",
            api.Derivation(
                "merge",
                parents=["llama-a", "gemma-b"],
                recipe={"method": "slerp", "t": 0.5},
                force=True,
            ),
        )
    assert [p["name"] for p in merged.parents] == ["llama-a:latest", "gemma-b:latest"]

"""The derivation context and the one resolver, on a real hub (FOLK_HOME per test)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from folklm.errors import FolkError
from folklm.hub import api
from folklm.hub.derive import derive
from folklm.hub.resolve import hub_name, is_hub_name, resolve

pytestmark = [
    pytest.mark.filterwarnings("ignore:no licence found"),
    pytest.mark.filterwarnings("ignore:the licence of data file"),
]


def _staged(home: Path) -> list[str]:
    return sorted(p.name for p in home.iterdir() if p.name.startswith("."))


def test_derive_stages_times_records_and_registers(home, tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    api.import_path(folder, "base", license="mit")
    data = tmp_path / "calib.txt"
    data.write_text("some calibration text\n")
    with derive(
        "child:v1",
        "quantize",
        parents=["base"],
        recipe={"scheme": "int8"},
        data_files=[data],
        seed=7,
    ) as d:
        assert d.name == "child:v1" and not d.folder.exists()
        shutil.copytree(folder, d.folder)
        d.derivation.recipe = {**d.derivation.recipe, "dtype": "float32"}
        time.sleep(0.05)
    entry = api.show("child:v1")
    assert d.entry is not None and d.entry.digest == entry.digest
    assert entry.operation == "quantize" and entry.seed == 7
    assert entry.recipe == {"scheme": "int8", "dtype": "float32"}
    assert [p["name"] for p in entry.parents] == ["base:latest"]
    assert entry.data_files[0]["name"] == "calib.txt"
    assert entry.compute["duration_s"] >= 0.05 and entry.folklm_version
    assert entry.license["expression"] == "mit"  # inherited through the parent
    assert _staged(home) == [] and not d.folder.exists()  # staging removed, blobs kept
    assert (api.resolve_model("child:v1") / "model.safetensors").is_file()


def test_derive_leaves_nothing_on_failure(home, tiny_models):
    _, folder = tiny_models("llama")
    api.import_path(folder, "base", license="mit")
    before = api.list_models()
    with pytest.raises(RuntimeError, match="killed mid-way"):
        with derive("half", "merge", parents=["base"]) as d:
            shutil.copytree(folder, d.folder)
            raise RuntimeError("killed mid-way")
    assert api.list_models() == before and _staged(home) == []
    with pytest.raises(FolkError, match="unknown model 'absent:latest'"):
        with derive("orphan", "merge", parents=["absent"]) as d:  # refused at registration
            shutil.copytree(folder, d.folder)
    assert api.list_models() == before and _staged(home) == []


def test_derive_checks_the_name_first_and_cleans_a_given_folder(home, tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    ran = []
    with pytest.raises(FolkError, match="invalid"):
        with derive("Bad Name!", "finetune"):
            ran.append(True)
    assert ran == []
    out = tmp_path / "run" / "adapter"
    with pytest.raises(FolkError):
        with derive("t", "finetune", parents=["absent"], folder=out) as d:
            shutil.copytree(folder, d.folder)
    assert not out.exists()
    with derive("t", "finetune", folder=out) as d:  # a kept folder: copied, not linked
        shutil.copytree(folder, d.folder)
    assert (out / "model.safetensors").is_file() and api.show("t").operation == "finetune"


def test_one_resolver_for_names_paths_and_the_default(home, tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    api.import_path(folder, "tiny:v2", license="mit")
    assert resolve(str(folder)).path == folder and resolve(str(folder)).name is None
    src = resolve("tiny:v2")
    assert src.name == "tiny:v2" and (src.path / "config.json").is_file()
    missing = tmp_path / "nope"
    assert resolve(str(missing)).path == missing  # a path: the loader names what is missing
    assert is_hub_name("tiny") and not is_hub_name("a/b") and not is_hub_name("m.gguf")
    assert hub_name("tiny:v2") == "tiny:v2" and hub_name(str(folder)) is None
    with pytest.raises(FolkError, match="unknown model 'absent:latest'"):
        resolve("absent")

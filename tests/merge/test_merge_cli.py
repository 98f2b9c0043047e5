"""``folk merge`` end to end: registry and path inputs, lineage, card, sharding, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from mergetest import folk, folk_json, make_model, write_yaml
from safetensors.torch import load_file, save_file

TIES = """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.6}}
  - model: {b}
    parameters: {{weight: [0.5, 1.0], density: 0.4}}
dtype: float32
seed: 7
"""


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    monkeypatch.setenv("FOLK_HOME", str(path))
    return path


def test_merge_registry_inputs_records_lineage_and_card(tiny_trio, tmp_path, home):
    from folklm.hub.api import import_path, resolve_model, show

    digests = {}
    for name, folder in zip(["m0:v1", "m1:v1", "m2:latest"], tiny_trio, strict=True):
        digests[name] = import_path(folder, name=name, license="apache-2.0").digest
    recipe = write_yaml(tmp_path, TIES.format(base="m0:v1", a="m1:v1", b="m2"))
    out = folk_json("merge", str(recipe), "--out", "trio:ties")
    assert out["name"] == "trio:ties" and out["hash"].startswith("sha256:")
    assert [p["name"] for p in out["parents"]] == ["m0:v1", "m1:v1", "m2:latest"]
    for p in out["parents"]:
        assert p["content_hash"] == f"sha256:{digests[p['name']]}"
    assert out["peak_rss_bytes"] > 0 and out["seed"] == 7
    entry = show("trio:ties")
    assert entry.operation == "merge" and entry.seed == 7
    assert entry.recipe["yaml"] == recipe.read_text()
    assert entry.recipe["config"]["merge_method"] == "ties"
    card = folk("card", "trio:ties").stdout
    front = card.split("---")[1]
    assert 'base_model_relation: "merge"' in front
    for name in ("m0:v1", "m1:v1", "m2"):
        assert f'- "{name}"' in front
    # the merged entry loads and runs through folklm
    import folklm

    llm = folklm.load("trio:ties", fast=False)
    ids = torch.tensor([[1, 5, 9, 11]])
    with torch.no_grad():
        logits = llm.model(ids)
    assert torch.isfinite(logits if torch.is_tensor(logits) else logits[0]).all()
    assert (resolve_model("trio:ties") / "tokenizer.json").is_file()


def test_merge_path_inputs_record_their_hashes(tiny_trio, tmp_path, home):
    recipe = write_yaml(tmp_path, TIES.format(base=tiny_trio[0], a=tiny_trio[1], b=tiny_trio[2]))
    out = folk_json("merge", str(recipe), "--out", "paths:v1")
    assert out["parents"] == []
    from folklm.hub.api import show
    from folklm.hub.modelinfo import collect_files
    from folklm.hub.store import manifest_digest, sha256_file

    inputs = show("paths:v1").recipe["inputs"]
    assert [r["role"] for r in inputs] == ["base", "model", "model"]
    for rec, folder in zip(inputs, tiny_trio, strict=True):
        files = collect_files(folder)
        want = manifest_digest([(r, *sha256_file(p)) for r, p in files.items()])
        assert rec["path"] == str(folder.resolve()) and rec["content_hash"] == f"sha256:{want}"


def test_sharded_output_equals_single_file(tiny_trio, tmp_path, home):
    import yaml

    from folklm.merge import parse_config, run_merge

    data = yaml.safe_load(TIES.format(base=tiny_trio[0], a=tiny_trio[1], b=tiny_trio[2]))
    run_merge(parse_config(data), tmp_path / "one")
    run_merge(parse_config(data), tmp_path / "many", max_shard_bytes=20_000)
    shards = sorted((tmp_path / "many").glob("model-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    one = load_file(tmp_path / "one" / "model.safetensors")
    many = {}
    for s in shards:
        many.update(load_file(s))  # the safetensors library reads our streamed files
    assert set(index["weight_map"]) == set(one) == set(many)
    for k in one:
        assert torch.equal(one[k], many[k])
    # the DARE-free recipe is deterministic; bfloat16 output rounds the float32 result
    data["out_dtype"] = "bfloat16"
    run_merge(parse_config(data), tmp_path / "bf16")
    bf = load_file(tmp_path / "bf16" / "model.safetensors")
    for k in one:
        assert bf[k].dtype == torch.bfloat16 and torch.equal(bf[k], one[k].to(torch.bfloat16))
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def _one_line_error(proc, *needles):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("folk: error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def broken_models(tiny_trio, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    missing = root / "missing"
    shutil.copytree(tiny_trio[1], missing)
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, missing / "model.safetensors", metadata={"format": "pt"})
    return {
        "missing": missing,
        "shape": make_model(root / "shape", 5, intermediate_size=80),
        "arch": _qwen(root / "arch"),
        "vocab": make_model(root / "vocab", 6, tokens="u"),
    }


def _qwen(folder):
    import transformers as tf
    from mergetest import COMMON, write_tiny_tokenizer

    tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON)).save_pretrained(folder)
    write_tiny_tokenizer(folder)
    return folder


@pytest.mark.parametrize(
    "case, needles",
    [
        ("missing", ["missing tensor 'model.layers.1.mlp.up_proj.weight'"]),
        ("shape", ["tensor 'model.layers.0.mlp.down_proj.weight'", "(64, 96)", "(64, 80)"]),
        ("arch", ["different architecture", "qwen2"]),
        ("vocab", ["tokenizer differs", "identical vocabularies"]),
    ],
)
def test_mismatched_inputs_are_refused(case, needles, broken_models, tiny_trio, tmp_path, home):
    recipe = write_yaml(
        tmp_path, TIES.format(base=tiny_trio[0], a=tiny_trio[2], b=broken_models[case])
    )
    proc = folk("merge", str(recipe), "--out", "bad:v1", check=False)
    _one_line_error(proc, *needles)
    assert not home.exists() or "bad" not in folk("ls", "--json").stdout
    assert not [p for p in home.glob(".merge-*")] if home.exists() else True


@pytest.mark.parametrize(
    "edit, needles",
    [
        (("ties", "tie_break"), ["merge_method: unknown method 'tie_break'"]),
        (("density: 0.6", "density: 1.5"), ["models[0].parameters", "density must be in (0, 1]"]),
        (("density: 0.4", "density: 0"), ["models[1].parameters", "density must be in (0, 1]"]),
        (("weight: 1.0", "weight: heavy"), ["models[0].parameters", "'heavy'"]),
        (("seed: 7", "seed: [1"), ["not valid YAML"]),
    ],
)
def test_bad_recipes_are_one_line_errors(edit, needles, tiny_trio, tmp_path, home):
    text = TIES.format(base=tiny_trio[0], a=tiny_trio[1], b=tiny_trio[2]).replace(*edit)
    proc = folk("merge", str(write_yaml(tmp_path, text)), "--out", "bad:v1", check=False)
    _one_line_error(proc, *needles)


def test_unknown_inputs_and_gguf_are_refused(tiny_trio, tmp_path, home, default_gguf):
    text = TIES.format(base=tiny_trio[0], a=tiny_trio[1], b="no-such-model:v9")
    proc = folk("merge", str(write_yaml(tmp_path, text)), "--out", "bad:v1", check=False)
    _one_line_error(proc, "models[1]", "unknown model 'no-such-model:v9'")
    text = TIES.format(base=tiny_trio[0], a=tiny_trio[1], b=default_gguf)
    proc = folk("merge", str(write_yaml(tmp_path, text)), "--out", "bad:v1", check=False)
    _one_line_error(proc, "models[1]", "GGUF")

"""Recipe parsing: parameter resolution by depth and filter, and one-line field errors."""

from __future__ import annotations

import pytest

from folklm.errors import FolkError
from folklm.merge import parse_config
from folklm.merge.inputs import depth


def cfg(**over):
    data = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "b", "parameters": {"weight": [0.0, 1.0], "density": 0.5}},
        ],
    }
    data.update(over)
    return data


def test_gradients_interpolate_across_depth():
    c = parse_config(cfg())
    w = c.param(c.models[1], "weight")
    assert [w.at("model.layers.0.x", t) for t in (0.0, 0.25, 1.0)] == [0.0, 0.25, 1.0]
    w3 = parse_config(
        cfg(models=[{"model": "a", "parameters": {"weight": [0, 1, 3], "density": 1}}])
    ).models[0]
    assert w3.parameters["weight"].at("x", 0.75) == pytest.approx(2.0)
    assert depth("model.layers.3.mlp.up_proj.weight", 5) == 0.75
    assert depth("model.embed_tokens.weight", 5) == depth("lm_head.weight", 5) == 0.0


def test_filters_pick_the_first_match_and_models_override_globals():
    t = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.9}]
    c = parse_config(
        {
            "merge_method": "slerp",
            "base_model": "a",
            "models": [{"model": "a"}, {"model": "b"}],
            "parameters": {"t": t + [{"value": 0.3}]},
        }
    )
    assert [m.ref for m in c.models] == ["b"] and c.base.ref == "a"
    p = c.parameters["t"]
    assert p.at("model.layers.1.self_attn.q_proj.weight", 0.5) == 0.5
    assert p.at("model.layers.1.mlp.up_proj.weight", 0.5) == 0.9
    assert p.at("model.norm.weight", 0.0) == 0.3
    c = parse_config(cfg(parameters={"density": 0.2}))
    assert c.param(c.models[0], "density").at("x", 0) == 0.5  # the model's own wins
    c = parse_config(
        cfg(models=[{"model": "a", "parameters": {"weight": 1}}], parameters={"density": 0.2})
    )
    assert c.param(c.models[0], "density").at("x", 0) == 0.2


def test_adapter_references():
    c = parse_config(
        cfg(
            models=[{"model": "base+adapters/ad", "parameters": {"weight": 1}}],
            parameters={"density": 1},
        )
    )
    assert (c.models[0].ref, c.models[0].adapter) == ("base", "adapters/ad")


@pytest.mark.parametrize(
    "data, message",
    [
        (cfg(merge_method="frankenmerge"), "merge_method: unknown method 'frankenmerge'"),
        (cfg(merge_method=None), "merge_method: unknown method None"),
        (cfg(slices=[]), "slices: unknown field (folklm merges whole models: use 'models')"),
        (cfg(base_model=None), "base_model: required by merge_method ties"),
        (cfg(models=[]), "models: expected a non-empty list"),
        (
            cfg(models=[{"model": "a", "parameters": {"weight": 1, "density": 0}}]),
            "models[0].parameters.density: density must be in (0, 1], got 0",
        ),
        (
            cfg(models=[{"model": "a", "parameters": {"weight": 1, "density": [0.5, 1.01]}}]),
            "models[0].parameters.density: density must be in (0, 1], got 1.01",
        ),
        (
            cfg(models=[{"model": "a", "parameters": {"weight": "1", "density": 1}}]),
            "models[0].parameters.weight: weight must be a number or a list of numbers, got '1'",
        ),
        (
            cfg(models=[{"model": "a", "parameters": {"weight": [1, None], "density": 1}}]),
            "weight must be a number or a list of numbers, got None",
        ),
        (
            cfg(models=[{"model": "a", "parameters": {"weight": True, "density": 1}}]),
            "weight must be a number or a list of numbers, got True",
        ),
        (
            cfg(models=[{"model": "a", "parameters": {"density": 1}}]),
            "models[0].parameters.weight: required",
        ),
        (
            cfg(models=[{"model": "a", "parameters": {"weight": 1}}]),
            "models[0].parameters.density: required by ties",
        ),
        (
            cfg(models=[{"model": "a", "parameters": {"weight": 1, "t": 1}}]),
            "models[0].parameters.t: unknown parameter",
        ),
        (cfg(models=[{"model": "a", "weight": 1}]), "models[0].weight: unknown field"),
        (cfg(models=[{"model": 3}]), "models[0].model: expected a registry name or a path"),
        (cfg(parameters={"normalize": "yes"}), "parameters.normalize: expected true or false"),
        (cfg(dtype="float8"), "dtype: expected one of float32, bfloat16, float16"),
        (cfg(seed="x"), "seed: expected an integer"),
        (
            {
                "merge_method": "slerp",
                "base_model": "a",
                "models": ["b", "c"],
                "parameters": {"t": 0.5},
            },
            "exactly one other model, got 2",
        ),
        (
            {"merge_method": "slerp", "base_model": "a", "models": ["b"], "parameters": {"t": 1.5}},
            "parameters.t: t must be in [0, 1], got 1.5",
        ),
        ({"merge_method": "slerp", "base_model": "a", "models": ["b"]}, "parameters.t: required"),
        ({"merge_method": "lora_fuse", "base_model": "a"}, "adapter: lora_fuse needs"),
        ([1, 2], "expected a YAML mapping"),
    ],
)
def test_errors_name_the_field(data, message):
    with pytest.raises(FolkError) as e:
        parse_config(data, "r.yaml")
    text = str(e.value)
    assert text.startswith("r.yaml: ") and message in text and "\n" not in text

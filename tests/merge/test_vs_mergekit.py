"""``folk merge`` against mergekit (arcee-ai/mergekit), the community's reference tool:
the same YAML recipe on the same tiny random models gives the same tensors."""

from __future__ import annotations

import mergekit  # noqa: F401  (the reference: missing must fail, not skip)
import pytest
import torch
import yaml
from mergetest import folk_json, write_yaml
from safetensors.torch import load_file

RECIPES = {
    "linear": """
merge_method: linear
models:
  - model: {m0}
    parameters: {{weight: 0.3}}
  - model: {m1}
    parameters: {{weight: [0.1, 0.9]}}
  - model: {m2}
    parameters: {{weight: 0.5}}
dtype: float32
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {m0}
models:
  - model: {m1}
    parameters: {{weight: [0.2, 1.0, 0.4]}}
  - model: {m2}
    parameters: {{weight: 0.5}}
parameters: {{lambda: 0.9}}
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: {m0}
models:
  - model: {m0}
  - model: {m1}
    parameters: {{weight: [0.2, 0.8], density: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.5, density: [0.3, 0.9]}}
parameters: {{normalize: true}}
dtype: float32
""",
    "slerp": """
merge_method: slerp
base_model: {m0}
models:
  - model: {m0}
  - model: {m1}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.4
dtype: float32
""",
}


def mergekit_merge(data: dict, out) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(
        MergeConfiguration.model_validate(data),
        str(out),
        MergeOptions(copy_tokenizer=False, quiet=True),
    )
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_same_tensors_as_mergekit(method, tiny_trio, tmp_path, monkeypatch):
    monkeypatch.setenv("FOLK_HOME", str(tmp_path / "home"))
    text = RECIPES[method].format(m0=tiny_trio[0], m1=tiny_trio[1], m2=tiny_trio[2])
    want = mergekit_merge(yaml.safe_load(text), tmp_path / "mergekit-out")
    out = folk_json("merge", str(write_yaml(tmp_path, text)), "--out", f"{method}-merge:v1")
    from folklm.hub.api import resolve_model

    got = load_file(resolve_model(out["name"]) / "model.safetensors")
    assert set(got) == set(want)
    base = load_file(tiny_trio[0] / "model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)
    # the merge changed the tensors (slerp's t = 0 leaves a few equal to the base)
    changed = [n for n in want if not torch.equal(got[n], base[n])]
    assert len(changed) > 0.5 * len(want)

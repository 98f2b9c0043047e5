"""LoRA / DoRA fuse against PEFT's own ``merge_and_unload`` on a tiny random model."""

from __future__ import annotations

import peft
import pytest
import torch
from mergetest import folk_json, write_yaml
from safetensors.torch import load_file


def _adapter(base_folder, out, use_dora: bool, seed: int):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj", "down_proj"],
        use_dora=use_dora,
        lora_dropout=0.0,
    )
    pm = peft.get_peft_model(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:  # lora_B starts at zero: make the adapter do something
                p.copy_(0.3 * torch.randn_like(p))
    pm.save_pretrained(out)
    merged = pm.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_fuse_matches_peft_merge_and_unload(use_dora, tiny_trio, tmp_path, monkeypatch):
    monkeypatch.setenv("FOLK_HOME", str(tmp_path / "home"))
    want = _adapter(tiny_trio[0], tmp_path / "adapter", use_dora, seed=3)
    recipe = write_yaml(
        tmp_path,
        f"merge_method: lora_fuse\nbase_model: {tiny_trio[0]}\nadapter: {tmp_path / 'adapter'}\n",
    )
    out = folk_json("merge", str(recipe), "--out", "fused:v1")
    assert out["operation"] == "lora_fuse"
    assert out["inputs"][0]["adapter"] == str((tmp_path / "adapter").resolve())
    from folklm.hub.api import resolve_model

    got = load_file(resolve_model("fused:v1") / "model.safetensors")
    base = load_file(tiny_trio[0] / "model.safetensors")
    assert set(got) == set(want)
    changed = 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
        changed += not torch.equal(got[name], base[name])
    assert changed == 3 * 3  # three targets in each of the three layers


def test_adapters_fuse_inside_a_ties_recipe(tiny_trio, tmp_path, monkeypatch):
    """``BASE+ADAPTER`` inputs: TIES over two fused adapters equals TIES over the
    models PEFT fused."""
    from folklm.merge import methods, parse_config, run_merge

    a = _adapter(tiny_trio[0], tmp_path / "a", False, seed=1)
    b = _adapter(tiny_trio[0], tmp_path / "b", False, seed=2)
    base = load_file(tiny_trio[0] / "model.safetensors")
    cfg = parse_config(
        {
            "merge_method": "ties",
            "base_model": str(tiny_trio[0]),
            "models": [
                {"model": f"{tiny_trio[0]}+{tmp_path / 'a'}", "parameters": {"weight": 1.0}},
                {"model": f"{tiny_trio[0]}+{tmp_path / 'b'}", "parameters": {"weight": 1.0}},
            ],
            "parameters": {"density": 0.5},
        }
    )
    run_merge(cfg, tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    for name in got:
        want = methods.ties(base[name], [a[name], b[name]], [1.0, 1.0], [0.5, 0.5])
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-5)

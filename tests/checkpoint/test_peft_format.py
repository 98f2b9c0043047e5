"""PEFT adapter files: round trip, bad input, fused weights vs float64 maths."""

import json

import pytest
import torch

from folklm.checkpoint.peft import (
    AdapterConfig,
    LoraWeights,
    fused_weight,
    load_adapter,
    save_adapter,
)
from folklm.errors import FolkError


def _layers(r=4, d_in=12, d_out=8, dora=False):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    return {
        "model.layers.0.self_attn.q_proj": LoraWeights(
            torch.randn(r, d_in, generator=g),
            torch.randn(d_out, r, generator=g),
            torch.rand(d_out, generator=g) + 0.5 if dora else None,
        )
    }


@pytest.mark.parametrize("dora", [False, True])
def test_round_trip(tmp_path, dora):
    cfg = AdapterConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=dora)
    layers = _layers(dora=dora)
    save_adapter(tmp_path, cfg, layers)
    names = json.loads((tmp_path / "adapter_config.json").read_text())
    assert names["r"] == 4 and names["peft_type"] == "LORA"
    back = load_adapter(tmp_path)
    assert back.config.scaling == 2.0 and back.config.use_dora is dora
    (name, w), (name2, w2) = next(iter(layers.items())), next(iter(back.layers.items()))
    assert name == name2
    assert torch.equal(w.A, w2.A) and torch.equal(w.B, w2.B)
    assert (w2.magnitude is None) is (not dora)


def test_rslora_scaling():
    cfg = AdapterConfig(r=16, lora_alpha=8, target_modules=["q_proj"], use_rslora=True)
    assert cfg.scaling == pytest.approx(2.0)


@pytest.mark.parametrize("dora", [False, True])
def test_fused_weight_matches_float64(dora):
    lw = next(iter(_layers(dora=dora).values()))
    W = torch.randn(8, 12)
    got = fused_weight(W, lw, 0.5)
    V = W.double() + 0.5 * lw.B.double() @ lw.A.double()
    if dora:
        V = lw.magnitude.double()[:, None] * V / V.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got.double(), V, rtol=1e-5, atol=1e-5)


def test_bad_adapters(tmp_path):
    with pytest.raises(FolkError, match="no adapter_config.json"):
        load_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": 0, "lora_alpha": 8, "target_modules": []}')
    with pytest.raises(FolkError, match="'r' must be a positive integer"):
        load_adapter(tmp_path)
    cfg = AdapterConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    save_adapter(tmp_path, cfg, _layers())
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"r": 2, "lora_alpha": 8, "target_modules": ["q_proj"]})
    )
    with pytest.raises(FolkError, match="do not match r=2"):
        load_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save({}, tmp_path / "adapter_model.bin")
    with pytest.raises(FolkError, match="pickled weights"):
        load_adapter(tmp_path)

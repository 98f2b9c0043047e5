"""Packed and fused linears: same numbers, same state dict, less memory than a copy.

Llama-family models decode through the native step (``engine.native_step``) and keep plain
linears; these tests switch it off to check the packed path that every other model takes.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import folklm
from folklm.engine.fast import PackedLinear

FAMILIES = ["llama", "llama_tied", "mistral", "mixtral", "qwen2"]


@pytest.fixture(autouse=True)
def _packed_path(monkeypatch):
    monkeypatch.setenv("FOLK_NATIVE_STEP", "0")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_model_equals_plain_model(tiny_models, family):
    hf, folder = tiny_models(family)
    plain = folklm.load(folder, fast=False, dtype="float32")
    fast = folklm.load(folder, dtype="float32")
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    assert any(isinstance(m, PackedLinear) for m in fast.model.modules())
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(plain.model(ids), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.model(ids), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])
def test_state_dict_keeps_hugging_face_names_and_values(tiny_models, family):
    _, folder = tiny_models(family)
    fast = folklm.load(folder, dtype="float32")
    ours = fast.model.state_dict()
    ref = load_file(str(folder / "model.safetensors"))  # the checkpoint's own names
    if fast.config.tie_word_embeddings:
        ref.pop("lm_head.weight", None)
        ours.pop("lm_head.weight", None)
    assert sorted(ours) == sorted(ref)
    for name, tensor in ref.items():
        torch.testing.assert_close(ours[name], tensor, msg=name)


def test_fused_projections_are_used(tiny_models):
    _, folder = tiny_models("qwen2")
    attn = folklm.load(folder, dtype="float32").model.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, PackedLinear)
    assert [name for name, _ in attn.qkv_proj.parts] == ["q_proj", "k_proj", "v_proj"]
    assert attn.qkv_proj.bias is not None  # qwen2's q/k/v biases, concatenated
    assert not hasattr(attn, "q_proj")  # the dense copies are gone


def test_bfloat16_packed_close_to_float32(tiny_models):
    _, folder = tiny_models("mistral")
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        f32 = folklm.load(folder, fast=False, dtype="float32").model(ids)
        bf16 = folklm.load(folder, dtype="bfloat16").model(ids)
    assert (bf16 - f32).norm() / f32.norm() < 0.05

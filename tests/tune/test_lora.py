"""LoRA / rsLoRA / DoRA / QLoRA layers against HF ``peft`` and float64 maths."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import folklm
from folklm.checkpoint.peft import AdapterConfig, load_adapter, save_adapter
from folklm.errors import FolkError
from folklm.kernels.nf4 import NF4Linear
from folklm.tune.lora import (
    LoRALinear,
    adapter_state,
    apply_lora,
    attach_adapter,
    merge_lora,
    resolve_targets,
    set_adapters_enabled,
)

IDS = torch.tensor([[5, 17, 3, 99, 42, 7, 64, 11], [1, 2, 3, 4, 5, 6, 7, 8]])


def _randomise(model: nn.Module, seed: int = 0) -> None:
    """Give every LoRA B (zero at init) and DoRA magnitude random values."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
                if m.lora_magnitude_vector is not None:
                    m.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(m.out_features, generator=g))


CASES = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_rslora=True
    ),
    dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "down_proj"], use_dora=True),
]


@pytest.mark.parametrize("case", CASES, ids=["lora", "rslora", "dora"])
def test_folklm_adapter_loads_in_peft(tiny_models, tmp_path, case):
    hf, folder = tiny_models("llama")
    llm = folklm.load(folder, fast=False, dtype="float32")
    torch.manual_seed(0)
    cfg = AdapterConfig(**case)
    apply_lora(llm.model, cfg)
    _randomise(llm.model)
    save_adapter(tmp_path / "ad", cfg, adapter_state(llm.model))
    ours = llm.model(IDS)

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ad").eval()
    with torch.no_grad():
        theirs = pm(IDS).logits
        plain = hf(IDS).logits
    assert not torch.allclose(plain, theirs, atol=1e-3)  # the adapter changes something
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=["lora", "rslora", "dora"])
def test_peft_adapter_loads_in_folklm(tiny_models, tmp_path, case):
    hf, folder = tiny_models("llama")
    torch.manual_seed(1)
    lc = peft.LoraConfig(init_lora_weights=False, **case)  # random B: a non-zero update
    pm = peft.get_peft_model(copy.deepcopy(hf), lc).eval()
    if case.get("use_dora"):
        with torch.no_grad():  # move m away from ||W + sBA|| so it matters
            for n, p in pm.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1.1)
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = pm(IDS).logits

    llm = folklm.load(folder, fast=False, dtype="float32")
    attach_adapter(llm.model, tmp_path / "peft")
    torch.testing.assert_close(llm.model(IDS), theirs, atol=1e-4, rtol=0)
    merged = folklm.load(folder, fast=False, dtype="float32")
    attach_adapter(merged.model, tmp_path / "peft", merge=True)
    torch.testing.assert_close(merged.model(IDS), theirs, atol=1e-4, rtol=0)


def test_dora_magnitude_key_is_peft_name(tiny_models, tmp_path):
    hf, _ = tiny_models("llama")
    lc = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    peft.get_peft_model(copy.deepcopy(hf), lc).save_pretrained(tmp_path / "p")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    ad = load_adapter(tmp_path / "p")
    assert ad.layers["model.layers.0.self_attn.q_proj"].magnitude is not None


def test_forward_and_gradients_match_peft_training_mode(tiny_models):
    """Same loss and same LoRA gradients as PEFT (DoRA: the detached norm included)."""
    hf, folder = tiny_models("llama")
    case = dict(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"], use_dora=True)
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False, **case))
    llm = folklm.load(folder, fast=False, dtype="float32")
    apply_lora(llm.model, AdapterConfig(**case))
    sd = {
        k.replace("base_model.model.", "").replace(".default", ""): v
        for k, v in pm.state_dict().items()
        if "lora_" in k
    }
    sd = {
        k.replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): v for k, v in sd.items()
    }
    missing = llm.model.load_state_dict(sd, strict=False)
    assert not missing.unexpected_keys
    labels = IDS.clone()
    out = pm(IDS, labels=labels)
    out.loss.backward()
    logits = llm.model(IDS)
    loss = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1)
    )
    loss.backward()
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=0)
    theirs = {
        k.replace("base_model.model.", "")
        .replace(".default", "")
        .replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad
        for k, p in pm.named_parameters()
        if p.requires_grad
    }
    ours = {k: p.grad for k, p in llm.model.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=1e-4, msg=k)


def test_merge_is_w_plus_scaled_ba_and_twice_is_refused():
    torch.manual_seed(0)
    lin = nn.Linear(12, 10, bias=True)
    layer = LoRALinear.from_base(lin, r=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    W, A, B = (t.detach().double() for t in (lin.weight, layer.lora_A.weight, layer.lora_B.weight))
    expected = W + (6.0 / 3) * B @ A  # float64 reference
    model = nn.Sequential(layer)
    merge_lora(model)
    assert isinstance(model[0], nn.Linear)
    torch.testing.assert_close(model[0].weight.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(model[0].bias, lin.bias)
    with pytest.raises(FolkError, match="nothing to merge"):
        merge_lora(model)


def test_qlora_wraps_nf4_base():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = NF4Linear.from_linear(lin)
    layer = LoRALinear.from_base(q, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 64, dtype=torch.float64)
    Wq = q.dequantize(torch.float64)
    ref = x @ (Wq + 2.0 * layer.lora_B.weight.double() @ layer.lora_A.weight.double()).T
    ref = ref + lin.bias.double()
    torch.testing.assert_close(layer(x.float()).double(), ref, atol=1e-4, rtol=0)
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_A.weight", "lora_B.weight"]
    fused = layer.fuse()
    torch.testing.assert_close(fused(x.float()).double(), ref, atol=1e-4, rtol=0)


def test_disable_gives_base_and_targets_are_checked(tiny_models):
    _, folder = tiny_models("llama")
    llm = folklm.load(folder, fast=False, dtype="float32")
    base = llm.model(IDS)
    with pytest.raises(FolkError, match=r"'qkv' does not exist.*valid names: .*q_proj"):
        resolve_targets(llm.model, ["qkv"])
    assert len(resolve_targets(llm.model, "all-linear")) == 2 * 7
    with pytest.raises(FolkError, match="rank"):
        apply_lora(llm.model, AdapterConfig(r=0, lora_alpha=1, target_modules=["q_proj"]))
    apply_lora(llm.model, AdapterConfig(r=2, lora_alpha=2, target_modules=["all-linear"]))
    _randomise(llm.model)
    assert not torch.allclose(llm.model(IDS), base, atol=1e-3)
    set_adapters_enabled(llm.model, False)
    torch.testing.assert_close(llm.model(IDS), base)

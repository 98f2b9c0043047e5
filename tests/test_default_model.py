"""End to end on the real bundled model, SmolLM2-135M-Instruct (Q4_1 GGUF)."""

from __future__ import annotations

import pytest
import torch

import folklm

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in one sentence why the sky is blue.",
]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_equals_transformers_on_the_same_gguf(prompt, default_llm, hf_default):
    hf, hf_tok = hf_default
    messages = [{"role": "user", "content": prompt}]
    ours_ids = default_llm.tokenizer.encode_chat(messages)
    ref_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref_ids = ref_ids["input_ids"] if not isinstance(ref_ids, list) else ref_ids
    assert ours_ids == list(ref_ids)  # same template, same tokenizer
    out = default_llm.generate(messages, max_new_tokens=32, ignore_eos=True)
    # Both sides run exactly 32 steps through any <|im_end|> (no EOS stop, no EOS ban).
    saved, hf.generation_config.eos_token_id = hf.generation_config.eos_token_id, None
    try:
        with torch.inference_mode():
            # An explicit mask: the pad id (2) is also <|im_end|>, which the prompt contains,
            # and transformers would otherwise infer those tokens to be padding.
            x = torch.tensor([ours_ids])
            ref = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=32,
                do_sample=False,
                pad_token_id=2,
            )
    finally:
        hf.generation_config.eos_token_id = saved
    ref = ref[0, len(ours_ids) :].tolist()
    assert len(ref) == 32
    assert out.token_ids == ref


@pytest.mark.slow
def test_logits_equal_transformers_on_the_same_gguf(default_llm, hf_default):
    hf, _ = hf_default
    ids = torch.randint(0, 49152, (1, 40))
    with torch.inference_mode():
        torch.testing.assert_close(default_llm.model(ids), hf(ids).logits, atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_paris(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended on <|im_end|>, not by running out of tokens


@pytest.mark.slow
def test_streaming_equals_generate_and_batch(default_llm):
    prompt = "Name three animals that live in the ocean."
    pieces = list(default_llm.stream(prompt, max_new_tokens=40))
    single = default_llm.generate(prompt, max_new_tokens=40)
    assert "".join(pieces) == single.text
    batch = default_llm.generate([prompt, "Hi!"], max_new_tokens=40)
    assert batch[0].text == single.text


@pytest.mark.slow
def test_default_model_cached_conversion_is_reused(default_llm):
    from folklm.hub.defaults import default_model_folder

    folder = default_model_folder()
    assert (folder / "model.safetensors").is_file()
    mtime = (folder / "model.safetensors").stat().st_mtime
    again = folklm.load()
    assert (folder / "model.safetensors").stat().st_mtime == mtime
    assert again.source == str(folder)

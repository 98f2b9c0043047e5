"""Generation semantics on tiny models: EOS lists, max tokens, prompts, batching rules."""

from __future__ import annotations

import json
import shutil

import pytest

import folklm
from folklm.errors import FolkError


def copy_of(folder, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(folder, dst)
    return dst


def test_stops_on_every_eos_id_of_generation_config(tiny_models, tmp_path):
    _, folder = tiny_models("llama")
    free = folklm.load(folder, dtype="float32").generate(
        "t5 t6 t7", max_new_tokens=12, ignore_eos=True
    )
    # make the 6th generated token a second end-of-sequence id, as Llama 3 lists several
    target = free.token_ids[5]
    if target in free.token_ids[:5]:
        pytest.skip("greedy output repeats the chosen token earlier; nothing to test")
    dst = copy_of(folder, tmp_path)
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, target]}))
    llm = folklm.load(dst, dtype="float32")
    assert target in llm.eos_token_ids and 2 in llm.eos_token_ids
    out = llm.generate("t5 t6 t7", max_new_tokens=12)
    assert out.token_ids == free.token_ids[:6]
    assert out.finish_reason == "stop"
    assert out.text == llm.tokenizer.decode(free.token_ids[:5])


def test_max_tokens_and_length_finish(tiny_models):
    _, folder = tiny_models("qwen2")
    llm = folklm.load(folder, dtype="float32")
    out = llm.generate("t9", max_new_tokens=5, ignore_eos=True)
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    zero = llm.generate("t9", max_new_tokens=0)
    assert zero.token_ids == [] and zero.finish_reason == "length"


@pytest.mark.parametrize("bad", [dict(max_new_tokens=-1), dict(top_p=0.0), dict(temperature=-1)])
def test_bad_sampling_values(tiny_models, bad):
    _, folder = tiny_models("llama")
    with pytest.raises(FolkError, match=next(iter(bad))):
        folklm.load(folder, dtype="float32").generate("t5", **bad)


def test_empty_prompt_and_context_overflow(tiny_models):
    _, folder = tiny_models("llama")
    llm = folklm.load(folder, dtype="float32")
    with pytest.raises(FolkError, match="empty prompt"):
        llm.generate("  ")
    long_prompt = " ".join(["t7"] * 250)  # context is 256 tokens
    with pytest.raises(FolkError, match=r"250 tokens.*256"):
        llm.generate(long_prompt, max_new_tokens=10)

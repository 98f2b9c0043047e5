"""Every newer family through the commands a user types: ``folk quantize -s int8`` into the
hub, then ``folk serve`` answering a chat request from the official OpenAI client.

The models are tiny random ones (as in the parity tests) with a real byte-level BPE tokenizer
and a ChatML template. The served answer must be the greedy answer folklm's library gives for
the same quantized entry and the same messages, token for token.
"""

from __future__ import annotations

import json

import pytest
from clitest import folk
from serverutil import LiveServer

import folklm
from folklm.serve.app import ServeConfig, build_app

FAMILIES = ["qwen3", "qwen3_moe", "gemma2", "gemma3", "phi3", "olmo2", "mistral_nemo"]
MESSAGES = [{"role": "user", "content": "To be, or not to be"}]


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_int8_and_serve_a_chat(bpe_models, family: str) -> None:
    import openai

    folder = bpe_models(family)
    name = f"matrix-{family.replace('_', '-')}:int8"
    run = folk("quantize", str(folder), "-s", "int8", "-o", name, "--dtype", "float32", "--json")
    assert run.returncode == 0, run.stderr
    entry = json.loads(run.stdout)
    assert "int8" in str(entry["quantization"]), entry

    llm = folklm.load(name)
    assert llm.config.model_type == folklm.load(folder).config.model_type
    want = llm.chat(MESSAGES, max_new_tokens=12, temperature=0)

    config = ServeConfig(models=[name], names=["m"], max_batch=4, max_queue=8, max_len=96)
    with LiveServer(build_app(config)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        r = client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=12, temperature=0
        )
    assert r.choices[0].message.content == want.text, (family, want.text)
    assert r.usage.completion_tokens == want.completion_tokens > 0
    assert r.choices[0].finish_reason == want.finish_reason

"""The official ``openai`` client against ``folk serve`` of the bundled model, in-process.

Responses parse in the client's own pydantic models; numbers are checked against
independent computations (transformers' own load of the same GGUF for every generated
token's logprobs and for the embeddings, ``jsonschema`` for structured output,
``folklm.generate`` for greedy text).
"""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import jsonschema
import numpy as np
import openai
import pytest
import torch
from pydantic import BaseModel, Field

# the real default model behind a server, and transformers' load of it: slow
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.slow]

MODEL = "smollm2"


@pytest.fixture(scope="module")
def client(default_server):
    return openai.OpenAI(base_url=default_server.url + "/v1", api_key="none", max_retries=0)


def test_models_and_health(client, default_server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(default_server.url + "/health").json()["status"] == "ok"


def test_chat_sync_matches_library_greedy(client, default_server):
    import folklm

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=20)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    llm = default_server.engine().llm
    ref = llm.generate(messages, folklm.SamplingParams(max_new_tokens=20))
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == ref.prompt_tokens
    assert r.usage.completion_tokens == ref.completion_tokens
    assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")


def test_chat_async_concurrent(default_server):
    async def main():
        c = openai.AsyncOpenAI(base_url=default_server.url + "/v1", api_key="x", max_retries=0)
        tasks = [
            c.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Count to {i}."}],
                max_tokens=8,
                temperature=0.8,
                seed=i,
            )
            for i in range(4)
        ]
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert all(r.choices[0].message.content for r in results)
    assert all(r.usage.completion_tokens <= 8 for r in results)


def test_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say a short sentence about cats."}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens > 0
    same = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say a short sentence about cats."}],
        max_tokens=16,
        temperature=0,
    )
    assert text == same.choices[0].message.content


def test_n_choices_and_seed(client):
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Name an animal."}],
        max_tokens=8,
        temperature=1.0,
        n=3,
        seed=7,
    )
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # choices sample independently


def test_chat_logprobs_are_the_model_distribution(client, default_server, hf_default):
    """Every generated token's logprob and top-3 against transformers' own load of the same
    GGUF: one full forward pass (no cache, no batching), log_softmax in float64."""
    messages = [{"role": "user", "content": "Hello!"}]
    n = 8
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=n, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == n
    hf, tok = hf_default
    ids = default_server.engine().llm.tokenizer.encode_chat(messages)
    with torch.no_grad():  # transformers' greedy tokens, then one pass over all of them
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, top_p=None)
        gen = out[0, len(ids) :].tolist()
        lp = hf(out).logits[0].double().log_softmax(-1)  # (T, V) float64
    assert len(gen) == n

    def token_bytes(t: int) -> bytes:  # the server shows special tokens as no bytes
        if t in tok.all_special_ids:
            return b""
        return tok.convert_tokens_to_string([tok.convert_ids_to_tokens(t)]).encode()

    worst = 0.0
    for i, (item, token) in enumerate(zip(content, gen, strict=True)):
        row = lp[len(ids) - 1 + i]
        assert bytes(item.bytes) == token_bytes(token), i
        worst = max(worst, abs(item.logprob - float(row[token])))
        top = row.topk(3)
        assert [bytes(t.bytes) for t in item.top_logprobs] == [
            token_bytes(t) for t in top.indices.tolist()
        ], i
        for got, want in zip(item.top_logprobs, top.values.tolist(), strict=True):
            worst = max(worst, abs(got.logprob - want))
    print(f"largest logprob difference from transformers (float64 log_softmax): {worst:.2e}")
    assert worst < 1e-4


class Person(BaseModel):
    name: str
    age: int
    hobbies: list[str] = Field(max_length=3)  # maxItems: a small model repeats itself


def test_json_schema_output_validates(client):
    r = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person: name, age and hobbies."}],
        response_format=Person,
        max_tokens=120,
        temperature=0.7,
        seed=3,
    )
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop", msg.content
    assert isinstance(msg.parsed, Person)
    jsonschema.validate(json.loads(msg.content), Person.model_json_schema())


def test_json_object_parses(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give a JSON object with a city and country."}],
        response_format={"type": "json_object"},
        max_tokens=60,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_completions_echo_logprobs(client, default_server):
    llm = default_server.engine().llm
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    r = client.completions.create(
        model=MODEL, prompt=[ids, ids[:5]], max_tokens=1, echo=True, logprobs=2, temperature=0
    )
    assert [c.index for c in r.choices] == [0, 1]
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    with torch.no_grad():
        ref = llm.model(torch.tensor([ids]))[0].log_softmax(-1)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(float(ref[t - 1, ids[t]]), abs=1e-4)
        assert max(lp.top_logprobs[t].values()) == pytest.approx(float(ref[t - 1].max()), abs=1e-4)
    assert r.choices[0].text.startswith("The quick brown fox")


def test_completions_text_prompts_and_stop(client):
    r = client.completions.create(
        model=MODEL, prompt=["1, 2, 3, 4,", "a, b, c,"], max_tokens=12, temperature=0, stop=[","]
    )
    assert len(r.choices) == 2
    assert all("," not in c.text and c.finish_reason == "stop" for c in r.choices)


def test_embeddings(client, hf_default):
    """Each vector against transformers on the same model: the final (normed) hidden states
    of its own tokenization, mean-pooled over the tokens, L2-normalised, in float64."""
    texts = ["a cat", "a kitten", "tax law", "The quick brown fox jumps over the lazy dog."]
    r = client.embeddings.create(model=MODEL, input=texts)
    v = torch.tensor([d.embedding for d in r.data], dtype=torch.float64)
    hf, tok = hf_default
    assert v.shape == (len(texts), hf.config.hidden_size)
    worst = 0.0
    for text, got in zip(texts, v, strict=True):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            h = hf.model(ids).last_hidden_state[0].double().mean(dim=0)
        want = h / h.norm()
        worst = max(worst, float((got - want).abs().max()))
    print(f"largest embedding difference from transformers: {worst:.2e}")
    assert worst < 1e-5
    sims = v @ v.T  # a sanity check of meaning, not of numbers: cat is nearer kitten
    assert sims[0, 1] > sims[0, 2]
    assert r.usage.prompt_tokens == sum(len(tok(t).input_ids) for t in texts)
    b64 = client.embeddings.create(model=MODEL, input="a cat", encoding_format="base64")
    raw = base64.b64decode(b64.data[0].embedding)  # asked for explicitly: left encoded
    assert torch.allclose(torch.tensor(np.frombuffer(raw, dtype="<f4").copy()).double(), v[0])


def test_errors_are_openai_shaped(client, default_server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=10**6
        )
    assert "maximum context length is 8192" in e.value.message and "1000000" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], n=-1
        )
    assert e.value.body["param"] == "n"
    r = httpx.post(default_server.url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_metrics(client, default_server):
    text = httpx.get(default_server.url + "/metrics").text
    assert 'folk_time_to_first_token_seconds_bucket{le="+Inf"}' in text
    assert 'folk_queue_depth{model="smollm2"} 0' in text
    assert 'folk_http_requests_total{route="/v1/chat/completions",status="200"}' in text

"""The official ``openai`` client against ``folk serve`` of the bundled model, in-process.

Responses parse in the client's own pydantic models; numbers are checked against
independent computations (a full forward pass for logprobs, ``jsonschema`` for structured
output, ``folklm.generate`` for greedy text).
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

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

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


def test_chat_logprobs_are_the_model_distribution(client, default_server):
    messages = [{"role": "user", "content": "Hello!"}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    llm = default_server.engine().llm
    ids = llm.tokenizer.encode_chat(messages)
    gen = []
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy
        gen.append(bytes(item.bytes))
    with torch.no_grad():  # reference: one full forward pass, no cache, no batching
        full = torch.tensor([ids + llm.tokenizer.encode(b"".join(gen).decode(), False)])
        lp = llm.model(full)[0].log_softmax(-1)
    first = lp[len(ids) - 1]
    assert content[0].logprob == pytest.approx(float(first.max()), abs=1e-4)


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


def test_embeddings(client):
    r = client.embeddings.create(model=MODEL, input=["a cat", "a kitten", "tax law"])
    v = torch.tensor([d.embedding for d in r.data])
    assert v.shape == (3, 576)
    assert torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-5)
    b64 = client.embeddings.create(model=MODEL, input="a cat", encoding_format="base64")
    raw = base64.b64decode(b64.data[0].embedding)  # asked for explicitly: left encoded
    assert torch.allclose(torch.tensor(np.frombuffer(raw, dtype="<f4").copy()), v[0], atol=1e-6)


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

"""Constrained decoding (llguidance over the bundled vocabulary): what the masks let through
validates against ``jsonschema`` (the reference) for JSON Schema with the keywords the
old automaton refused (pattern, numeric and length bounds), a JSON object and a regex;
hostile schemas are refused with the limit named, and in bounded time."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
import torch

from folklm.engine.constrained import GrammarCache, GrammarTokenizer
from folklm.engine.grammar import MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, check_schema
from folklm.errors import FolkError

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 6},
        "age": {"type": "integer", "minimum": 3, "maximum": 90},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
        "pet": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}]},
        "kind": {"enum": ["a", "b", 3]},
        "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    },
    "required": ["name", "age", "code", "tags", "pet", "kind", "score"],
    "additionalProperties": False,
    "$defs": {
        "Pet": {
            "type": "object",
            "properties": {"legs": {"type": "integer", "minimum": 0, "maximum": 8}},
            "additionalProperties": False,
        }
    },
}


@pytest.fixture(scope="module")
def cache(default_llm):
    tok = GrammarTokenizer(
        default_llm.tokenizer, default_llm.config.vocab_size, default_llm.eos_token_ids
    )
    return GrammarCache(tok)


def sample(constraint, eos: list[int], seed: int, steps: int = 120) -> tuple[str, bool]:
    """Random logits through the masks (the constraint alone decides): text, ended."""
    g = torch.Generator().manual_seed(seed)
    state = constraint.start()
    tokens: list[int] = []
    for _ in range(steps):
        mask = constraint.allowed(state)
        assert mask.shape == (constraint.size,) and mask.any()
        scores = torch.randn(constraint.size, generator=g).masked_fill(~mask, float("-inf"))
        token = int(scores.argmax())
        state = constraint.advance(state, token)
        if token in eos or constraint.done(state):
            return constraint.tokenizer.ll.decode_str(tokens + [token]), True
        tokens.append(token)
    return constraint.tokenizer.ll.decode_str(tokens), False


@pytest.mark.parametrize("seed", range(4))
def test_schema_outputs_validate(cache, default_llm, seed):
    c = cache.compile("json_schema", check_schema(SCHEMA))
    text, ended = sample(c, default_llm.eos_token_ids, seed, steps=400)
    assert ended, text
    jsonschema.validate(json.loads(text), SCHEMA)
    assert list(json.loads(text)) == list(SCHEMA["properties"])  # the schema's order


def test_json_object_and_regex(cache, default_llm):
    for seed in range(3):
        obj = cache.compile("json_object", None)
        text, ended = sample(obj, default_llm.eos_token_ids, seed, 40)
        if ended:  # an open object may run past the step budget; what ended must parse
            assert isinstance(json.loads(text), dict)
        text, ended = sample(cache.compile("regex", r"[0-9]{3}-[a-z]{2,4}"), [], seed)
        assert ended and re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text


def test_eos_only_when_complete(cache, default_llm):
    c = cache.compile("json_schema", check_schema({"type": "integer"}))
    eos = default_llm.eos_token_ids[0]
    state = c.start()
    assert not c.allowed(state)[eos]  # nothing written yet
    state = c.advance(state, default_llm.tokenizer.encode("7")[0])
    assert c.allowed(state)[eos]


@pytest.mark.parametrize(
    "schema, message",
    [
        ({"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}, "admits no value"),
        (
            {
                "$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}},
                "$ref": "#/$defs/A",
            },
            "admits no value",
        ),
        ({"$ref": 5}, "$ref must be a string"),
        ({"$ref": "#/$defs/Missing"}, "does not exist"),
        ({"$ref": "http://example.com/s.json"}, "does not fetch"),
        ({"type": "wat"}, "Invalid type: wat"),
        ({"type": "string", "pattern": "(("}, "unclosed group"),
    ],
)
def test_bad_schemas_are_refused_with_a_reason(cache, schema, message):
    with pytest.raises(FolkError, match=re.escape(message)):
        cache.compile("json_schema", check_schema(schema))


def nested_type_lists(depth: int) -> dict:
    """Finding 1 of issue 16: a 20-level version (984 bytes) took 10 s to compile."""
    s: dict = {"type": "string"}
    for _ in range(depth):
        s = {"type": ["object", "null", "string", "integer"], "properties": {"a": s}}
    return s


def test_hostile_schemas_cost_little_or_are_refused(cache):
    t = time.perf_counter()
    cache.compile("json_schema", check_schema(nested_type_lists(30)))
    cache.compile("json_schema", check_schema({"enum": [f"v{i}" for i in range(5000)]}))
    elapsed = time.perf_counter() - t  # printed, not asserted (a shared machine)
    print(f"30 nested type lists + a 5,000-value enum compiled in {elapsed:.2f} s")
    with pytest.raises(FolkError, match=f"the limit is {MAX_SCHEMA_DEPTH} levels"):
        check_schema(nested_type_lists(40))
    with pytest.raises(FolkError, match=f"the limit is {MAX_SCHEMA_BYTES} bytes"):
        check_schema({"enum": ["x" * 100] * 3000})


def test_cache_stays_within_its_byte_budget(default_llm):
    tok = GrammarTokenizer(
        default_llm.tokenizer, default_llm.config.vocab_size, default_llm.eos_token_ids
    )
    cache = GrammarCache(tok, budget_bytes=300_000)
    for i in range(12):
        cache.compile("json_schema", check_schema({"enum": [f"{i}-{k}" for k in range(300)]}))
        assert cache.nbytes <= 300_000 or len(cache) == 1
    assert 1 <= len(cache) < 12
    last = check_schema({"enum": [f"11-{k}" for k in range(300)]})
    assert cache.get("json_schema", last) is cache.compile("json_schema", last)  # a hit

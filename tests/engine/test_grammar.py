"""The JSON automaton of constrained decoding, against Python's ``json`` and ``jsonschema``
(the references), and its fast vocabulary masks against walking every token."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from folklm.engine.constrained import JsonConstraint, Vocabulary
from folklm.engine.grammar import JsonGrammar
from folklm.errors import FolkError

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)


def accepts(g: JsonGrammar, text: str) -> bool:
    state = g.start()
    for ch in text:
        state = g.feed(state, ch)
        if state is None:
            return False
    return g.accepting(state)


@settings(max_examples=300, deadline=None)
@given(
    obj=st.dictionaries(st.text(max_size=5), json_values, max_size=4),
    indent=st.sampled_from([None, 2]),
)
def test_every_json_object_is_accepted(obj, indent):
    g = JsonGrammar(None)
    assert accepts(g, json.dumps(obj, indent=indent))
    assert accepts(g, json.dumps(obj, ensure_ascii=False))


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet='{}[]":,0123456789.eE-+tfrunlsa \\', max_size=14))
def test_accepted_text_parses(text):
    """Whatever the automaton accepts as complete is a JSON object (json.loads agrees)."""
    if accepts(JsonGrammar(None), text):
        assert isinstance(json.loads(text), dict)


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2},
        "pet": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}]},
        "kind": {"enum": ["a", "b", 3]},
    },
    "required": ["name", "age", "tags", "pet", "kind"],
    "additionalProperties": False,
    "$defs": {"Pet": {"type": "object", "properties": {"legs": {"type": "number"}}}},
}


@pytest.mark.parametrize(
    "text, ok",
    [
        ('{"name":"x","age":3,"tags":["a"],"pet":null,"kind":"a"}', True),
        ('{"name":"x","age":3,"tags":["a","b"],"pet":{"legs":4.5e1},"kind":3}', True),
        ('{"name":"x","age":3.5,"tags":["a"],"pet":null,"kind":"a"}', False),  # integer
        ('{"name":"x","age":3,"tags":[],"pet":null,"kind":"a"}', False),  # minItems
        ('{"name":"x","age":3,"tags":["a","b","c"],"pet":null,"kind":"a"}', False),  # maxItems
        ('{"name":"x","age":3,"tags":["a"],"pet":null,"kind":"c"}', False),  # enum
        ('{"age":3,"name":"x","tags":["a"],"pet":null,"kind":"a"}', False),  # property order
        ('{"name":"x\\u00e9\\n","age":-0,"tags":["a"],"pet":null,"kind":"b"}', True),
    ],
)
def test_schema_automaton(text, ok):
    assert accepts(JsonGrammar(SCHEMA), text) == ok
    if ok:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_unsupported_schema_keywords_are_refused():
    with pytest.raises(FolkError, match="keyword 'pattern' is not supported"):
        JsonGrammar({"type": "string", "pattern": "a+"})
    with pytest.raises(FolkError, match="points nowhere"):
        JsonGrammar({"$ref": "#/$defs/Missing"})


@pytest.mark.slow  # the real default model's 49,152-token vocabulary
def test_fast_masks_equal_walking_every_token(default_llm):
    tok = default_llm.tokenizer
    vocab = Vocabulary(tok, default_llm.config.vocab_size, default_llm.eos_token_ids)
    c = JsonConstraint(vocab, SCHEMA)
    states = [c.start()]
    for text in [
        '{"name":"',
        '{"name":"Al',
        '{"name":"Al","age":1',
        '{"name":"A","age":1,"tags":[',
    ]:
        states.append(c._walk(c.start(), text))
    for state in states:
        fast = c.allowed(state)
        slow = torch.zeros_like(fast)
        for i, t in enumerate(vocab.texts):
            if t is not None and c._walk(state, t) is not None:
                slow[i] = True
        if c.grammar.accepting(state):
            slow[vocab.eos] = True
        assert torch.equal(fast, slow)
        assert fast.any()

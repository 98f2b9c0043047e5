"""Response formats for constrained decoding: checks and llguidance grammar text.

A response format is a JSON Schema (https://json-schema.org; ``pattern``, numeric bounds
and string lengths included), "any JSON object", or a regular expression. Before anything
is compiled, :func:`check_schema` bounds what a request may ask for -- the schema's size
in bytes and its nesting depth -- so that a hostile schema is refused with a 400 naming
the limit instead of costing compile time. :func:`grammar_for` turns a format into the
grammar text of llguidance (https://github.com/guidance-ai/llguidance), whose Earley
parser and lazily built lexer give the token masks (``engine.constrained``); the options
a schema could set itself (``x-guidance``) are overridden by ours: compact JSON (no free
whitespace, which a small model can repeat until ``max_tokens``), no unknown keywords
silently ignored.

``token_bytes`` (the raw bytes of each token) also serves logprobs in the server.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import llguidance

from folklm.errors import FolkError

if TYPE_CHECKING:  # pragma: no cover
    from llguidance._lib import JsonCompileOptions

    from folklm.tokenizer import Tokenizer

MAX_SCHEMA_BYTES = 256 << 10  # a schema's compact JSON text
MAX_SCHEMA_DEPTH = 64  # nested objects/arrays of the schema document itself
MAX_REGEX_CHARS = 4096
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "lenient": False}


def schema_depth(doc: Any) -> int:
    """Nesting depth of a JSON document (0 for a scalar), without recursion."""
    deepest, stack = 0, [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((c, depth + 1) for c in children)
    return deepest


def check_schema(schema: Any, where: str = "schema") -> str:
    """The schema's compact JSON text, after the size and depth limits.

    Raises:
        FolkError: not an object (or boolean), or over ``MAX_SCHEMA_BYTES`` /
            ``MAX_SCHEMA_DEPTH``; the message names the limit.
    """
    if not isinstance(schema, dict | bool):
        raise FolkError(f"{where}: expected a JSON Schema object, got {type(schema).__name__}")
    depth = schema_depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise FolkError(
            f"{where}: nested {depth} levels deep; the limit is {MAX_SCHEMA_DEPTH} levels"
        )
    text = json.dumps(schema, separators=(",", ":"))  # property order is output order
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise FolkError(
            f"{where}: {len(text.encode())} bytes; the limit is {MAX_SCHEMA_BYTES} bytes"
        )
    return text


def grammar_for(kind: str, spec: str | None) -> str:
    """llguidance grammar text for a response format.

    Args:
        kind: ``"json_schema"`` (``spec``: the schema's JSON text from :func:`check_schema`),
            ``"json_object"`` (any JSON object) or ``"regex"`` (``spec``: the expression,
            matched in full).

    Raises:
        FolkError: an unknown kind, a regex over ``MAX_REGEX_CHARS``, or a schema that is
            not a JSON object.
    """
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(
            {"type": "object"}, overrides=JSON_OPTIONS
        )
    if kind == "json_schema":
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(
                spec or "{}", overrides=JSON_OPTIONS
            )
        except ValueError as exc:
            raise FolkError(f"schema: {exc}") from None
    if kind == "regex":
        if spec is None or len(spec) > MAX_REGEX_CHARS:
            raise FolkError(f"regex: a pattern of at most {MAX_REGEX_CHARS} characters")
        return llguidance.LLMatcher.grammar_from_regex(spec)
    raise FolkError(f"unknown response format {kind!r}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-character table of byte-level BPE vocabularies."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The raw bytes each token id stands for (b"" for special tokens)."""
    data = json.loads(tokenizer.hf.to_str())
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    out = [b""] * (max(vocab.values()) + 1)
    decoder = json.dumps(data.get("decoder") or {})
    if "ByteLevel" in decoder:
        inverse = {c: b for b, c in _bytes_to_unicode().items()}
        for piece, i in vocab.items():
            if i not in special:
                out[i] = bytes(inverse.get(c, 0) for c in piece)
    else:
        for piece, i in vocab.items():
            if i in special:
                continue
            if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
                out[i] = bytes([int(piece[3:5], 16)])
            elif "\u2581" in piece:
                out[i] = piece.replace("\u2581", " ").encode()
            else:
                out[i] = tokenizer.decode([i]).encode()
    return out

"""Constrained decoding: only tokens that keep the output a valid JSON value (of a schema).

A character-level pushdown automaton over JSON (RFC 8259) -- whitespace only around
values and keys -- driven by a JSON Schema (https://json-schema.org, the subset OpenAI's
structured outputs use: object/properties/required, array/items/minItems/maxItems,
string, number, integer, boolean, null, enum, const, anyOf/oneOf, ``$ref`` to ``$defs``).
At each step the tokens whose text the automaton accepts from the current state form a
mask over the vocabulary (the approach of Willard & Louf, 2023, arXiv:2307.09702, here
computed lazily per state and memoised instead of compiled ahead). Objects of a schema
emit every declared property in order, which satisfies ``required`` and
``additionalProperties: false`` alike. EOS is allowed only once the value is complete.

A state is a tuple of frames (a stack), each a small tuple, so states hash and memoise.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from folklm.errors import FolkError

if TYPE_CHECKING:  # pragma: no cover
    from folklm.tokenizer import Tokenizer

UNSUPPORTED = (
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "patternProperties",
    "not",
    "if",
)
DIGITS = "0123456789"
ESCAPES = '"\\/bfnrt'
HEX = "0123456789abcdefABCDEF"
WHITESPACE = " \n"


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


# -- schema -> nodes ------------------------------------------------------------------------
class _Compiler:
    def __init__(self, root: dict):
        self.root = root
        self.nodes: list[tuple] = []
        self.refs: dict[str, int] = {}

    def node(self, s: Any, where: str = "schema") -> int:
        if s is True or s == {}:
            return self._add(("any",))
        if not isinstance(s, dict):
            raise FolkError(f"{where}: expected a JSON Schema object, got {s!r:.60}")
        if "$ref" in s:
            ref = s["$ref"]
            if ref not in self.refs:
                self.refs[ref] = idx = self._add(())  # filled in below
                self.nodes[idx] = self.nodes[self.node(self._resolve(ref, where), ref)]
            return self.refs[ref]
        for key in UNSUPPORTED:
            if key in s:
                raise FolkError(
                    f"{where}: keyword '{key}' is not supported by constrained decoding"
                )
        if "const" in s:
            return self._add(("lit", (json.dumps(s["const"], separators=(",", ":")),)))
        if "enum" in s:
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise FolkError(f"{where}.enum: expected a non-empty list")
            return self._add(
                ("lit", tuple(json.dumps(v, separators=(",", ":")) for v in s["enum"]))
            )
        options = s.get("anyOf") or s.get("oneOf")
        if options is None and len(s.get("allOf") or []) == 1:
            return self.node(s["allOf"][0], f"{where}.allOf[0]")
        if options is not None:
            if not isinstance(options, list) or not options:
                raise FolkError(f"{where}.anyOf: expected a non-empty list")
            ids = [self.node(o, f"{where}.anyOf[{i}]") for i, o in enumerate(options)]
            return self._add(("alt", tuple(ids)))
        t = s.get("type")
        if isinstance(t, list):
            return self._add(("alt", tuple(self.node({**s, "type": x}, where) for x in t)))
        if t == "object" or (t is None and "properties" in s):
            props = s.get("properties")
            if not props:
                return self._add(("any_object",))
            if not isinstance(props, dict):
                raise FolkError(f"{where}.properties: expected an object")
            idx = self._add(())  # filled in below, once the properties are compiled
            keys = tuple((k, self.node(v, f"{where}.properties.{k}")) for k, v in props.items())
            self.nodes[idx] = ("object", keys)
            return idx
        if t == "array":
            lo, hi = s.get("minItems", 0), s.get("maxItems")
            if not isinstance(lo, int) or (hi is not None and (not isinstance(hi, int) or hi < lo)):
                raise FolkError(f"{where}: minItems/maxItems must be integers, min <= max")
            return self._add(("array", self.node(s.get("items", {}), f"{where}.items"), lo, hi))
        if t == "string":
            return self._add(("string",))
        if t in ("number", "integer"):
            return self._add((t,))
        if t == "boolean":
            return self._add(("lit", ("true", "false")))
        if t == "null":
            return self._add(("lit", ("null",)))
        if t is None:
            return self._add(("any",))
        raise FolkError(f"{where}.type: unknown type {t!r}")

    def _add(self, node: tuple) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _resolve(self, ref: str, where: str) -> Any:
        if not ref.startswith("#/"):
            raise FolkError(f"{where}: only local $ref ('#/$defs/...') is supported, got {ref!r}")
        target: Any = self.root
        for part in ref[2:].split("/"):
            if not isinstance(target, dict) or part not in target:
                raise FolkError(f"{where}: $ref {ref!r} points nowhere")
            target = target[part]
        return target


# -- the automaton ------------------------------------------------------------------------
class JsonGrammar:
    """Compiled schema + the transition function over characters."""

    def __init__(self, schema: dict | None = None):
        self.nodes: list[tuple]
        if schema is None:
            self.nodes = [("any_object",)]
            self.root = 0
        else:
            c = _Compiler(schema)
            self.root = c.node(schema)
            self.nodes = c.nodes
        self.nodes.append(("any",))  # values inside schema-less objects and arrays
        self.any_id = len(self.nodes) - 1

    def start(self) -> tuple:
        return (("val", self.root),)

    def feed(self, stack: tuple, ch: str) -> tuple | None:
        while stack:
            top, rest = stack[-1], stack[:-1]
            r = self._step(top, ch)
            if r is None:
                return None
            if r == "refeed":  # top was complete and ch is not part of it
                stack = rest
                continue
            return rest + r
        return None

    def accepting(self, stack: tuple) -> bool:
        return not stack or (len(stack) == 1 and self._complete(stack[0]))

    def _complete(self, frame: tuple) -> bool:
        if frame[0] == "num":
            return frame[1] in ("zero", "int", "frac", "exp")
        if frame[0] == "lit":
            return any(len(c) == frame[2] for c in frame[1])
        return False

    def _value(self, node_id: int, ch: str) -> tuple | None:
        """Frames after ``ch`` starts a value of node ``node_id``."""
        n = self.nodes[node_id]
        kind = n[0]
        if kind == "alt":
            for option in n[1]:
                r = self._value(option, ch)
                if r is not None:
                    return r
            return None
        if kind == "any":
            if ch == "{":
                return (("gobj", "first"),)
            if ch == "[":
                return (("arr", None, 0, None, "first", 0),)
            if ch == '"':
                return (("str", 0),)
            if ch in DIGITS or ch == "-":
                return self._value_num(ch, False)
            return self._lit(("true", "false", "null"), 0, ch)
        if kind == "any_object":
            return (("gobj", "first"),) if ch == "{" else None
        if kind == "object":
            return (("obj", node_id, 0, 0),) if ch == "{" else None
        if kind == "array":
            return (("arr", n[1], n[2], n[3], "first", 0),) if ch == "[" else None
        if kind == "string":
            return (("str", 0),) if ch == '"' else None
        if kind in ("number", "integer"):
            return self._value_num(ch, kind == "integer") if ch in DIGITS or ch == "-" else None
        if kind == "lit":
            return self._lit(n[1], 0, ch)
        return None

    @staticmethod
    def _value_num(ch: str, integer: bool) -> tuple:
        return (("num", "sign" if ch == "-" else "zero" if ch == "0" else "int", integer),)

    @staticmethod
    def _lit(cands: tuple, pos: int, ch: str) -> tuple | None:
        keep = tuple(c for c in cands if len(c) > pos and c[pos] == ch)
        return (("lit", keep, pos + 1),) if keep else None

    def _obj_text(self, node_id: int, i: int) -> str:
        keys = self.nodes[node_id][1]
        if i == len(keys):
            return "}"
        return ("," if i else "") + json.dumps(keys[i][0]) + ":"

    def _step(self, f: tuple, ch: str):  # noqa: C901 - one branch per frame kind
        kind = f[0]
        if ch in WHITESPACE and (kind == "val" or kind == "arr" or kind == "gobj"):
            return (f,)  # whitespace around values and keys (pretty-printed JSON)
        if kind == "val":
            return self._value(f[1], ch)
        if kind == "str":
            esc = f[1]
            if esc == 0:
                if ch == '"':
                    return ()
                if ch == "\\":
                    return (("str", "e"),)
                return None if ord(ch) < 0x20 else (f,)
            if esc == "e":
                if ch == "u":
                    return (("str", 4),)
                return (("str", 0),) if ch in ESCAPES else None
            if ch not in HEX:
                return None
            return (("str", esc - 1 if esc > 1 else 0),)
        if kind == "num":
            phase, integer = f[1], f[2]
            nxt = None
            if phase == "sign":
                nxt = "zero" if ch == "0" else "int" if ch in DIGITS else None
            elif phase in ("zero", "int"):
                if ch in DIGITS and phase == "int":
                    nxt = "int"
                elif ch == "." and not integer:
                    nxt = "dot"
                elif ch in "eE" and not integer:
                    nxt = "e"
            elif phase in ("dot", "frac"):
                nxt = "frac" if ch in DIGITS else ("e" if ch in "eE" and phase == "frac" else None)
            elif phase == "e":
                nxt = "esign" if ch in "+-" else "exp" if ch in DIGITS else None
            elif phase in ("esign", "exp"):
                nxt = "exp" if ch in DIGITS else None
            if nxt is not None:
                return (("num", nxt, integer),)
            return "refeed" if self._complete(f) else None
        if kind == "lit":
            r = self._lit(f[1], f[2], ch)
            if r is not None:
                return r
            return "refeed" if self._complete(f) else None
        if kind == "obj":
            node_id, i, pos = f[1], f[2], f[3]
            text = self._obj_text(node_id, i)
            if ch != text[pos]:
                return None
            if pos + 1 < len(text):
                return (("obj", node_id, i, pos + 1),)
            if text == "}":
                return ()
            return (("obj", node_id, i + 1, 0), ("val", self.nodes[node_id][1][i][1]))
        if kind == "gobj":
            phase = f[1]
            if phase in ("first", "key"):
                if ch == '"':
                    return (("gobj", "colon"), ("str", 0))
                return () if ch == "}" and phase == "first" else None
            if phase == "colon":
                return (("gobj", "after"), ("val", self.any_id)) if ch == ":" else None
            if phase == "after":
                return (("gobj", "key"),) if ch == "," else () if ch == "}" else None
        if kind == "arr":
            _, item, lo, hi, phase, count = f
            if phase == "after":
                if ch == "," and (hi is None or count < hi):
                    return (("arr", item, lo, hi, "next", count),)
                return () if ch == "]" and count >= lo else None
            if phase == "first" and ch == "]":
                return () if lo == 0 else None
            if phase == "first" and hi == 0:
                return None
            child = self._value(item if item is not None else self.any_id, ch)
            return None if child is None else (("arr", item, lo, hi, "after", count + 1),) + child
        return None

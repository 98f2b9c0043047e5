"""Token masks for a character-level grammar (``engine.grammar``) over a real vocabulary.

For a grammar state, a token is allowed when the automaton accepts every character of its
text from that state. Two shortcuts keep this fast enough to run per decode step in
Python: inside a JSON string, tokens made only of ordinary characters (no quote, no
backslash, no control character) leave the state unchanged and are allowed in bulk; in
every other state only the tokens whose first character is accepted are walked. Masks are
memoised per state (states repeat: "inside a string at this place of the schema").
Tokens that are not whole UTF-8 text on their own are never allowed under a constraint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from folklm.engine.grammar import JsonGrammar, token_bytes

if TYPE_CHECKING:  # pragma: no cover
    from folklm.tokenizer import Tokenizer


class Vocabulary:
    """Token texts of one tokenizer, grouped for fast masking (built once per model)."""

    def __init__(self, tokenizer: Tokenizer, size: int, eos_ids: list[int]):
        self.size = size
        self.eos = [i for i in eos_ids if i < size]
        self.texts: list[str | None] = []
        for b in token_bytes(tokenizer)[:size]:
            try:
                text = b.decode("utf-8")
            except UnicodeDecodeError:
                text = ""
            self.texts.append(text or None)
        self.texts += [None] * (size - len(self.texts))
        plain, special = [], []
        self.by_first: dict[str, list[int]] = {}
        for i, t in enumerate(self.texts):
            if t is None:
                continue
            self.by_first.setdefault(t[0], []).append(i)
            if any(c in '"\\' or ord(c) < 0x20 for c in t):
                special.append(i)
            else:
                plain.append(i)
        self.plain = torch.tensor(plain, dtype=torch.long)
        self.special = special


class JsonConstraint:
    """The ``constraint`` object of a scheduler ``Request``: start/allowed/advance/done."""

    def __init__(self, vocab: Vocabulary, schema: dict | None = None, memo_limit: int = 4096):
        self.vocab = vocab
        self.grammar = JsonGrammar(schema)
        self.memo: dict[tuple, torch.Tensor] = {}
        self.memo_limit = memo_limit

    def start(self) -> tuple:
        return self.grammar.start()

    def _walk(self, state: tuple, text: str) -> tuple | None:
        for ch in text:
            new = self.grammar.feed(state, ch)
            if new is None:
                return None
            state = new
        return state

    def allowed(self, state: tuple) -> torch.Tensor:
        mask = self.memo.get(state)
        if mask is not None:
            return mask
        v = self.vocab
        mask = torch.zeros(v.size, dtype=torch.bool)
        if state and state[-1] == ("str", 0):
            mask[v.plain] = True
            candidates = v.special
        else:
            candidates = [
                i
                for ch, ids in v.by_first.items()
                if self.grammar.feed(state, ch) is not None
                for i in ids
            ]
        for i in candidates:
            text = v.texts[i]  # never None: candidates are tokens with a text
            if text is not None and self._walk(state, text) is not None:
                mask[i] = True
        if self.grammar.accepting(state):
            mask[v.eos] = True
        if len(self.memo) >= self.memo_limit:
            self.memo.clear()
        self.memo[state] = mask
        return mask

    def advance(self, state: tuple, token: int) -> tuple:
        text = self.vocab.texts[token] if token < self.vocab.size else None
        if text is None:
            return state  # EOS (only allowed when the value is complete)
        new = self._walk(state, text)
        return state if new is None else new

    def done(self, state: tuple) -> bool:
        return not state

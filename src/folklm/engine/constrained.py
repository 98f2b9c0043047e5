"""Token masks for constrained decoding, from llguidance over the model's own vocabulary.

llguidance (guidance-ai, the engine of llama.cpp's and vLLM's structured outputs) parses
the output with an Earley parser over a lazily built lexer, and computes each step's mask
over the token trie in well under a millisecond for typical schemas, with a fuel limit
per step (``LIMITS``), so no schema can make one step slow. A compiled grammar (one
``llguidance.LLMatcher`` in its start state) is cached per response format within a byte
budget (:class:`GrammarCache`); each sequence decodes with its own copy. Masks are not
memoised: one (V,) bool tensor exists per constrained row and step, then is dropped.

The README's security section gives the measured compile and mask costs next to those of
the hand-written automaton this replaced.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import llguidance
import numpy as np
import torch

from folklm.engine.grammar import grammar_for
from folklm.errors import FolkError

if TYPE_CHECKING:  # pragma: no cover
    from folklm.tokenizer import Tokenizer

# resource limits of one grammar (llguidance's own defaults are in parentheses)
LIMITS = dict(
    max_items_in_row=2000,  # (2000) branching of one production row
    initial_lexer_fuel=1_000_000,  # (1M) regex analysis at compile time (~50k per ms)
    step_lexer_fuel=200_000,  # (200k) lexer work per token mask (~14k per ms)
    step_max_items=50_000,  # (50k) Earley items per token mask (~20k per ms)
    max_lexer_states=20_000,  # (250k) lexer states, ~1-2 kB each: <= ~40 MB per grammar
    max_grammar_size=200_000,  # (500k) symbols in the grammar's productions
)
CACHE_BYTES = 64 << 20
ENTRY_OVERHEAD = 64 << 10  # a matcher's own memory besides its grammar text (an estimate)


def _limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**LIMITS, verbose_errors=False)  # type: ignore[arg-type]


class GrammarTokenizer:
    """The llguidance view of one model's tokenizer (built once per engine, ~0.5 s).

    Args:
        tokenizer: the model's tokenizer (its Hugging Face ``tokenizer.json`` is read).
        size: the model's vocabulary size V (logits width; may exceed the tokenizer's).
        eos_ids: end-of-sequence ids, allowed when the output is complete.
    """

    def __init__(self, tokenizer: Tokenizer, size: int, eos_ids: list[int]):
        self.size = size
        eos = [i for i in eos_ids if i < size]
        try:
            self.ll = llguidance.LLTokenizer(tokenizer.hf.to_str(), n_vocab=size, eos_token=eos)
        except Exception as exc:  # noqa: BLE001 - the Rust message says what is unsupported
            msg = f"constrained decoding is not available for this tokenizer: {exc}"
            raise FolkError(msg) from None


class GrammarConstraint:
    """The ``constraint`` of a scheduler ``Request``; a state is one sequence's matcher.

    ``start`` copies the compiled matcher, ``allowed`` computes its mask, ``advance``
    consumes a token (in place), ``done`` says the grammar admits nothing more. A matcher
    that errs (a limit hit mid-output) raises ``FolkError`` from ``allowed``: the
    scheduler then fails that request alone.
    """

    def __init__(self, tokenizer: GrammarTokenizer, grammar: str):
        self.tokenizer = tokenizer
        self.size = tokenizer.size
        self.matcher = llguidance.LLMatcher(tokenizer.ll, grammar, log_level=0, limits=_limits())
        first = self.matcher.deep_copy()
        if not self.matcher.is_error():
            first.compute_bitmask()  # the first mask, so a grammar that admits nothing fails here
        error = self.matcher.get_error() or first.get_error()
        if error:
            raise FolkError(_explain(error))
        self.nbytes = ENTRY_OVERHEAD + len(grammar)

    def start(self) -> llguidance.LLMatcher:
        return self.matcher.deep_copy()

    def allowed(self, state: llguidance.LLMatcher) -> torch.Tensor:
        bits = np.frombuffer(state.compute_bitmask(), dtype=np.uint8)
        if state.is_error():
            raise FolkError(f"response_format: {_explain(state.get_error())}")
        mask = np.unpackbits(bits, bitorder="little")[: self.size].astype(bool)
        return torch.from_numpy(mask)  # (V,) bool

    def advance(self, state: llguidance.LLMatcher, token: int) -> llguidance.LLMatcher:
        if not state.is_stopped() and not state.consume_token(token):
            raise FolkError(f"response_format: {_explain(state.get_error())}")
        return state

    def done(self, state: llguidance.LLMatcher) -> bool:
        return state.is_stopped()


def _explain(error: str) -> str:
    """llguidance's error as one line a client can act on."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip() and "non-verbose" not in ln]
    first = " ".join(lines)[:300] or "invalid grammar"
    if first.startswith("NoExtension"):
        return "the schema admits no value (a $ref that only refers to itself?)"
    if "ParserTooComplex" in first or "LexerTooComplex" in first or "limit" in first.lower():
        return f"the grammar is too complex ({first}); limits: {LIMITS}"
    return first


class GrammarCache:
    """Compiled grammars by response format, least recently used first out, within a byte
    budget (each entry counted as ``GrammarConstraint.nbytes``). Thread-safe."""

    def __init__(self, tokenizer: GrammarTokenizer, budget_bytes: int = CACHE_BYTES):
        self.tokenizer = tokenizer
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple[str, str | None], GrammarConstraint] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, kind: str, spec: str | None) -> GrammarConstraint | None:
        """The cached constraint, or None (then :meth:`compile` it, off the event loop)."""
        with self._lock:
            hit = self._entries.get((kind, spec))
            if hit is not None:
                self._entries.move_to_end((kind, spec))
            return hit

    def compile(self, kind: str, spec: str | None) -> GrammarConstraint:
        """Compile (or fetch) the constraint of a response format (``grammar.grammar_for``).

        Raises:
            FolkError: an invalid schema or regex, or one over a limit (the message says).
        """
        hit = self.get(kind, spec)
        if hit is not None:
            return hit
        constraint = GrammarConstraint(self.tokenizer, grammar_for(kind, spec))
        with self._lock:
            self._entries[(kind, spec)] = constraint
            self.nbytes += constraint.nbytes
            while self.nbytes > self.budget_bytes and len(self._entries) > 1:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.nbytes
        return constraint

    def __len__(self) -> int:
        return len(self._entries)

"""One text stream per sequence: token ids in, text deltas out, and why the sequence ends.

Every decoding path (``generate_stream`` for the CLI, the Python API and evaluation; the
server's output processor) turns tokens into text through ``TextStream`` only. It decodes
incrementally, so a multi-byte character split over several tokens is emitted once
complete, holds back text while it could still begin a stop string, and decides the finish:
"stop" on an end-of-sequence id, a stop string or a finished output constraint, "length"
at the token limit. The text of a finished stream is ``decode(ids)`` cut before the first
stop string.
"""

from __future__ import annotations

from collections.abc import Collection

from folklm.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without breaking UTF-8.

    Decoding token by token would split multi-byte characters (byte-level BPE spreads an
    emoji over several tokens) and lose SentencePiece's leading-space rules, so each step
    decodes a short window of recent tokens and emits only the part after the previous
    window's text, and nothing while the text ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids before this are already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prev = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        if len(text) > len(prev) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(prev) :]
        return ""

    def flush(self) -> str:
        """The held-back rest at the end of a run, even an incomplete character (U+FFFD),
        so that the streamed text always equals ``decode(all ids)``."""
        prev = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(prev) :] if len(text) > len(prev) else ""


class StopMatcher:
    """Finds stop strings in streamed text and holds back text that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        self.pending += delta
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        # Cut at the stop string that is complete first (earliest end; the longest if several end
        # there), as if the text had come one character at a time: the result must not depend
        # on how the text was split into deltas (stops "abcd" and "bc" over "abc" + "d").
        hits = [(i + len(s), i) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            _, cut = min(hits)
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0  # longest suffix of pending that is a prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """Detokenizer + stop strings + finish rule for one sequence.

    Args:
        tokenizer: the model's tokenizer.
        stop: stop strings (the text ends before the first one).
        eos: end-of-sequence ids (ignored with ``ignore_eos``).
        max_tokens: the most tokens the sequence may generate.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: list[str],
        eos: Collection[int],
        max_tokens: int,
        ignore_eos: bool = False,
    ):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(list(stop))
        self.eos = frozenset() if ignore_eos else frozenset(eos)
        self.max_tokens = max_tokens
        self.n_tokens = 0
        self.text = ""
        self.finish_reason: str | None = None
        self.ended_by_eos = False

    def push(self, token: int, constraint_done: bool = False) -> str:
        """Take one generated token; return the text it releases. ``finish_reason`` is set
        once the sequence is over (an EOS id, a stop string, a finished constraint, the
        token limit)."""
        self.n_tokens += 1
        reason = None
        if token in self.eos:
            self.ended_by_eos = True
            out, reason = "", "stop"
        else:
            out, hit = self.stops.feed(self.detok.push(token))
            if hit:
                self.finish_reason = "stop"
            elif constraint_done:
                reason = "stop"
            elif self.n_tokens >= self.max_tokens:
                reason = "length"
        if reason is not None:
            # the end: release what the detokenizer and the stop matcher held back; a stop
            # string in it still cuts the text
            more, hit = self.stops.feed(self.detok.flush())
            out += more + ("" if hit else self.stops.flush())
            self.finish_reason = "stop" if hit else reason
        self.text += out
        return out

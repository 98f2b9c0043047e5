"""A multi-turn chat session: keeps the history, streams answers, handles slash commands.

Used by ``folk chat``; input and output are injected so tests drive it without a terminal.
"""

from __future__ import annotations

from collections.abc import Callable

from folklm.engine.llm import LLM
from folklm.errors import FolkError
from folklm.ops.sampling import SamplingParams

HELP = "commands: /reset (forget the conversation), /exit (quit), /help"


class ChatSession:
    def __init__(self, llm: LLM, params: SamplingParams, system: str | None = None):
        self.llm = llm
        self.params = params
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str, write: Callable[[str], None]) -> str:
        """Add a user turn, stream the answer through ``write``, keep it in the history."""
        self.messages.append({"role": "user", "content": text})
        pieces = []
        try:
            for piece in self.llm.stream(self.messages, self.params):
                pieces.append(piece)
                write(piece)
        except FolkError:
            self.messages.pop()  # e.g. context full: leave the history as it was
            raise
        answer = "".join(pieces)
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def run(self, input_fn: Callable[[str], str], write: Callable[[str], None]) -> None:
        write(f"folk chat · {self.llm.source} · {HELP}\n")
        while True:
            try:
                line = input_fn(">>> ")
            except (EOFError, KeyboardInterrupt):
                write("\n")
                return
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit", "/bye"):
                return
            if text == "/reset":
                self.reset()
                write("(conversation cleared)\n")
                continue
            if text == "/help" or (text.startswith("/") and " " not in text):
                write(HELP + "\n")
                continue
            try:
                self.ask(text, write)
            except FolkError as e:
                write(f"\nfolk: error: {e}\n")
            write("\n")

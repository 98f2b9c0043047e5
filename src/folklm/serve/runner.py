"""Bridge between async HTTP handlers and the engine thread.

A handler submits one engine ``Request`` per choice (``n`` of them) and reads their
events from an ``asyncio.Queue`` fed thread-safely by the engine. Leaving the reader for
any reason -- the response finished, the client disconnected (the task is cancelled), an
error -- cancels every request still running, so its KV slot is freed before the next
decode step. A non-streaming handler is not cancelled when its client goes away, so it
passes its ``Request`` to :meth:`Submission.events`, which watches the connection and
raises ``ClientGone`` (after cancelling) when it closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request as HTTPRequest

from folklm.engine.grammar import token_bytes
from folklm.engine.scheduler import Engine, Request
from folklm.tokenizer import Tokenizer


class ClientGone(Exception):
    """The client closed the connection before its (non-streaming) answer was ready."""


@dataclass
class ServedModel:
    """A name a client may ask for: a base model, or an adapter on one."""

    name: str
    engine: Engine
    adapter: str | None = None  # key in the engine's MultiLoRA
    parent: str | None = None
    created: int = 0
    aliases: list[str] = field(default_factory=list)


class TokenText:
    """Token id -> text piece and raw bytes, for logprobs (cached per tokenizer)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.bytes = token_bytes(tokenizer)

    def text(self, token: int) -> str:
        b = self.bytes[token] if token < len(self.bytes) else b""
        return b.decode("utf-8", errors="replace")

    def raw(self, token: int) -> list[int]:
        return list(self.bytes[token]) if token < len(self.bytes) else []


class Submission:
    """Requests submitted together (the ``n`` choices, or several prompts); iterate the
    events as (index, event). Submitting raises ``QueueFull`` before anything is sent, so
    the handler can still answer 429; ``close`` (also on disconnect) cancels the rest."""

    def __init__(self, engine: Engine, requests: list[Request]):
        self.engine = engine
        self.requests = requests
        self.queue: asyncio.Queue[tuple[int, dict]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for i, req in enumerate(requests):
            req.sink = self._sink(loop, i)
        submitted = []
        try:
            for req in requests:
                submitted.append(engine.submit(req))
        except BaseException:
            for req in submitted:
                engine.cancel(req)
            raise

    def _sink(self, loop: asyncio.AbstractEventLoop, i: int):
        def sink(event: dict) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))

        return sink

    async def events(self, watch: HTTPRequest | None = None) -> AsyncIterator[tuple[int, dict]]:
        """(choice index, event) until every request finished; with ``watch``, raises
        ``ClientGone`` as soon as that connection closes (the requests are cancelled)."""
        remaining = len(self.requests)
        watcher = asyncio.create_task(self._watch(watch)) if watch is not None else None
        try:
            while remaining:
                i, event = await self.queue.get()
                if event["type"] == "gone":
                    raise ClientGone("the client closed the connection")
                if event["type"] == "finish":
                    remaining -= 1
                yield i, event
        finally:
            if watcher is not None:
                watcher.cancel()
            self.close()

    async def _watch(self, request: HTTPRequest) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.close()
                self.queue.put_nowait((-1, {"type": "gone"}))
                return

    def close(self) -> None:
        for req in self.requests:
            self.engine.cancel(req)  # a no-op for finished ones


def logprob_entry(table: TokenText, token: int, logprob: float, top: list) -> dict[str, Any]:
    """One item of a chat choice's ``logprobs.content`` (OpenAI's ChatCompletionTokenLogprob)."""
    return {
        "token": table.text(token),
        "logprob": logprob,
        "bytes": table.raw(token),
        "top_logprobs": [
            {"token": table.text(t), "logprob": lp, "bytes": table.raw(t)} for t, lp in top
        ],
    }

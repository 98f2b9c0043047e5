"""Bridge between async HTTP handlers and the engine thread.

A handler submits one engine ``Request`` per choice (``n`` of them) and reads their
events from an ``asyncio.Queue`` fed thread-safely by the engine. Leaving the reader for
any reason -- the response finished, the client disconnected (the task is cancelled), an
error -- cancels every request still running, so its KV slot is freed before the next
decode step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from folklm.engine.scheduler import Engine, Request


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

    def __init__(self, tokenizer: Any):
        from folklm.engine.grammar import token_bytes

        self.tokenizer = tokenizer
        self.bytes = token_bytes(tokenizer)

    def text(self, token: int) -> str:
        b = self.bytes[token] if token < len(self.bytes) else b""
        return b.decode("utf-8", errors="replace")

    def raw(self, token: int) -> list[int]:
        return list(self.bytes[token]) if token < len(self.bytes) else []


async def run(engine: Engine, requests: list[Request]) -> AsyncIterator[tuple[int, dict]]:
    """Submit ``requests`` and yield (index, event) until each has finished."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, dict]] = asyncio.Queue()

    def sink_for(i: int):
        def sink(event: dict) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (i, event))

        return sink

    for i, req in enumerate(requests):
        req.sink = sink_for(i)
    submitted: list[Request] = []
    try:
        for req in requests:
            submitted.append(engine.submit(req))
        remaining = len(requests)
        while remaining:
            i, event = await queue.get()
            if event["type"] == "finish":
                remaining -= 1
            yield i, event
    finally:
        for req in submitted:
            engine.cancel(req)  # no-op for finished ones

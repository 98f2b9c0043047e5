"""``POST /v1/chat/completions``: a conversation through the model's chat template.

Response bodies follow the OpenAI reference: ``chat.completion`` objects, or with
``stream`` a server-sent-event stream of ``chat.completion.chunk`` objects ending in
``data: [DONE]`` (with ``stream_options.include_usage`` a last chunk carries the usage and
no choices). ``response_format`` ``json_object`` / ``json_schema`` (and the extension
``{"type": "regex", "regex": ...}``) switch on constrained decoding (``engine.constrained``),
so the content always parses (unless cut by ``max_tokens``, reported as
``finish_reason: "length"``).

A grammar is compiled off the event loop, on a pool of ``COMPILE_THREADS`` threads, within
``COMPILE_TIMEOUT_S`` (waiting for a thread included); a schema over a size, depth or
complexity limit, or a slow one, is a 400 naming the limit. Compiled grammars are cached
per engine within a byte budget (``engine.constrained.GrammarCache``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request as HTTPRequest

from folklm.engine.constrained import GrammarConstraint
from folklm.engine.grammar import check_schema
from folklm.engine.scheduler import Request
from folklm.errors import FolkError
from folklm.ops.sampling import DISTRIBUTION_OPTIONS
from folklm.serve.protocol import ChatCompletionRequest, ResponseFormat, error_body, new_id, now
from folklm.serve.runner import ServedModel, Submission, TokenText, logprob_entry

DEFAULT_MAX_TOKENS = 1024
COMPILE_TIMEOUT_S = 5.0
COMPILE_THREADS = 2
_compile_pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="folk-grammar")


class EngineFailure(Exception):
    """The engine failed a request (a bug, not bad input): a 500."""


def completion_budget(served: ServedModel, n_prompt: int, asked: int | None) -> int:
    """``max_tokens`` as asked, or what the context leaves (capped); 400 if it cannot fit."""
    engine = served.engine
    if asked is None:
        asked = max(1, min(DEFAULT_MAX_TOKENS, engine.max_len - n_prompt))
    engine.check_length(n_prompt, asked)
    return asked


async def constraint_for(served: ServedModel, fmt: ResponseFormat | None) -> Any:
    """The shared compiled constraint of a response format, or None (plain text).

    Raises:
        FolkError: a bad format, a schema over a limit, or a compile over the time limit.
    """
    if fmt is None or fmt.type == "text":
        return None
    where = "response_format"
    spec: str | None = None
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise FolkError("response_format.json_schema is required when type is json_schema")
        where = "response_format.json_schema.schema"
    elif fmt.type == "regex":
        if fmt.regex is None:
            raise FolkError("response_format.regex is required when type is regex")
        where, spec = "response_format.regex", fmt.regex
    engine = served.engine

    def compile_() -> GrammarConstraint:
        nonlocal spec
        if fmt.type == "json_schema":
            assert fmt.json_schema is not None  # checked above
            spec = check_schema(fmt.json_schema.schema_ or {})
        return engine.grammars().compile(fmt.type, spec)

    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(
            loop.run_in_executor(_compile_pool, compile_), COMPILE_TIMEOUT_S
        )
    except TimeoutError:
        raise FolkError(
            f"{where}: compiling the grammar took longer than the limit of {COMPILE_TIMEOUT_S:g} s"
        ) from None
    except FolkError as exc:
        message = str(exc).removeprefix("schema: ").removeprefix("regex: ")
        raise FolkError(f"{where}: {message}") from None


def make_requests(served: ServedModel, prompt: list[int], body: Any, max_tokens: int, **kw):
    """``n`` engine requests for one prompt; choice i uses seed + i."""
    options = {name: getattr(body, name) for name in DISTRIBUTION_OPTIONS}
    return [
        Request(
            prompt=prompt,
            max_tokens=max_tokens,
            sink=lambda e: None,
            seed=None if body.seed is None else body.seed + i,
            stop=body.stops(),
            adapter=served.adapter,
            **options,
            **kw,
        )
        for i in range(body.n)
    ]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def create(
    body: ChatCompletionRequest,
    served: ServedModel,
    table: TokenText,
    request: HTTPRequest | None = None,
):
    engine = served.engine
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]
    prompt = await asyncio.to_thread(engine.tokenizer.encode_chat, messages)
    if not prompt:
        raise FolkError("messages: the rendered prompt is empty")
    max_tokens = completion_budget(
        served, len(prompt), body.max_completion_tokens or body.max_tokens
    )
    constraint = await constraint_for(served, body.response_format)
    top = (body.top_logprobs or 0) if body.logprobs else None
    requests = make_requests(served, prompt, body, max_tokens, logprobs=top, constraint=constraint)
    sub = Submission(engine, requests)  # QueueFull here is still a 429
    rid, created = new_id("chatcmpl"), now()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(sub, body, rid, created, served.name, table, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    texts = [""] * body.n
    lps: list[list[dict]] = [[] for _ in range(body.n)]
    finish: list[str | None] = [None] * body.n
    completion = 0
    async for i, ev in sub.events(watch=request):
        if ev["type"] == "token":
            texts[i] += ev["text"]
            if ev["logprobs"] is not None:
                info = ev["logprobs"]
                lps[i].append(logprob_entry(table, ev["token"], info["logprob"], info["top"]))
        elif ev["type"] == "finish":
            if ev["finish_reason"] == "error":
                raise EngineFailure(ev.get("error") or "generation failed")
            finish[i] = ev["finish_reason"]
            completion += ev["completion_tokens"]
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": texts[i], "refusal": None},
            "logprobs": {"content": lps[i], "refusal": None} if top is not None else None,
            "finish_reason": finish[i],
        }
        for i in range(body.n)
    ]
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": served.name,
            "choices": choices,
            "usage": usage(len(prompt), completion),
            "system_fingerprint": None,
        }
    )


async def _stream(
    sub: Submission,
    body: ChatCompletionRequest,
    rid: str,
    created: int,
    model: str,
    table: TokenText,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(choices: list[dict], usage_: dict | None = None) -> str:
        data = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if include_usage:
            data["usage"] = usage_
        return sse(data)

    completion = 0
    prompt_tokens = len(sub.requests[0].prompt)
    try:
        for i in range(body.n):
            delta = {"role": "assistant", "content": ""}
            yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
        async for i, ev in sub.events():
            if ev["type"] == "token":
                info = ev["logprobs"]
                if not ev["text"] and info is None:
                    continue
                lp = None
                if info is not None:
                    entry = logprob_entry(table, ev["token"], info["logprob"], info["top"])
                    lp = {"content": [entry], "refusal": None}
                delta = {"content": ev["text"]}
                yield chunk([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": None}])
            elif ev["type"] == "finish":
                if ev["finish_reason"] == "error":
                    yield sse(error_body(ev.get("error") or "generation failed", "server_error"))
                    return
                completion += ev["completion_tokens"]
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {},
                            "logprobs": None,
                            "finish_reason": ev["finish_reason"],
                        }
                    ]
                )
        if include_usage:
            yield chunk([], usage(prompt_tokens, completion))
        yield "data: [DONE]\n\n"
    finally:
        sub.close()

"""``POST /v1/completions``: raw text (or token-id) prompts, the legacy OpenAI endpoint.

A prompt may be a string, a list of strings, a list of token ids or a list of such lists
(the form lm-evaluation-harness sends). With ``echo`` the prompt is repeated in the text,
and with ``echo`` + ``logprobs`` the prompt tokens get their log-probabilities too (None
for the first token) -- what ``lm_eval --model local-completions`` reads to score
log-likelihood tasks. Choice ``index`` is ``prompt_index * n + i``; prompts x ``n`` is
capped per request (``ServeConfig.max_choices``, default 64), a 400 beyond.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request as HTTPRequest

from folklm.errors import FolkError
from folklm.serve.chat import EngineFailure, completion_budget, make_requests, sse, usage
from folklm.serve.protocol import CompletionRequest, error_body, new_id, now
from folklm.serve.runner import ServedModel, Submission, TokenText


def encode_prompts(body: CompletionRequest, served: ServedModel) -> list[list[int]]:
    p = body.prompt
    tok = served.engine.tokenizer
    if isinstance(p, str):
        prompts = [tok.encode(p)]
    elif isinstance(p[0], str):
        prompts = [tok.encode(s) for s in p]
    elif isinstance(p[0], int):
        prompts = [list(p)]
    else:
        prompts = [list(x) for x in p]
    vocab = served.engine.vocab
    for k, ids in enumerate(prompts):
        if not ids:
            raise FolkError(f"prompt[{k}] is empty (no tokens)")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise FolkError(
                f"prompt[{k}]: token id {bad} is outside the vocabulary (0..{vocab - 1})"
            )
    return prompts


class _Choice:
    def __init__(self) -> None:
        self.text = ""
        self.tokens: list[int] = []
        self.logprobs: list[float | None] = []
        self.top: list[list] = []
        self.finish: str | None = None
        self.completion_tokens = 0


def _logprobs(table: TokenText, c: _Choice) -> dict[str, Any]:
    tokens = [table.text(t) for t in c.tokens]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": c.logprobs,
        "top_logprobs": [
            None if lp is None else {table.text(t): v for t, v in top}
            for lp, top in zip(c.logprobs, c.top, strict=True)
        ],
        "text_offset": offsets,
    }


async def create(
    body: CompletionRequest,
    served: ServedModel,
    table: TokenText,
    request: HTTPRequest | None = None,
    max_choices: int = 64,
):
    if body.suffix:
        raise FolkError("suffix is not supported")
    n_prompts = 1 if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else None
    n_prompts = n_prompts or len(body.prompt)
    if n_prompts * body.n > max_choices:
        raise FolkError(
            f"{n_prompts} prompts x n={body.n} = {n_prompts * body.n} choices; the limit is "
            f"{max_choices} per request (folk serve --max-choices)"
        )
    prompts = await asyncio.to_thread(encode_prompts, body, served)
    want_lp = body.logprobs is not None
    requests = []
    for ids in prompts:
        max_tokens = completion_budget(served, len(ids), body.max_tokens)
        requests += make_requests(
            served,
            ids,
            body,
            max_tokens,
            logprobs=body.logprobs,
            echo_logprobs=body.echo and want_lp,
        )
    sub = Submission(served.engine, requests)
    rid, created = new_id("cmpl"), now()
    if body.stream:
        return StreamingResponse(
            _stream(sub, body, rid, created, served.name, prompts),
            media_type="text/event-stream",
        )
    choices = [_Choice() for _ in requests]
    for k, c in enumerate(choices):
        if body.echo:
            c.text = served.engine.tokenizer.decode(prompts[k // body.n])
    async for i, ev in sub.events(watch=request):
        c = choices[i]
        if ev["type"] == "prompt_logprobs":
            for item in ev["data"]:
                c.tokens.append(item["token"])
                c.logprobs.append(item["logprob"])
                c.top.append(item["top"])
        elif ev["type"] == "token":
            c.text += ev["text"]
            if want_lp:  # EOS too: the list has one entry per generated token
                c.tokens.append(ev["token"])
                c.logprobs.append(ev["logprobs"]["logprob"])
                c.top.append(ev["logprobs"]["top"])
        elif ev["type"] == "finish":
            if ev["finish_reason"] == "error":
                raise EngineFailure(ev.get("error") or "generation failed")
            c.finish = ev["finish_reason"]
            c.completion_tokens = ev["completion_tokens"]
    out = [
        {
            "index": k,
            "text": c.text,
            "logprobs": _logprobs(table, c) if want_lp else None,
            "finish_reason": c.finish,
        }
        for k, c in enumerate(choices)
    ]
    n_prompt = sum(len(p) for p in prompts)
    return JSONResponse(
        {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": served.name,
            "choices": out,
            "usage": usage(n_prompt, sum(c.completion_tokens for c in choices)),
            "system_fingerprint": None,
        }
    )


async def _stream(sub, body, rid, created, model, prompts) -> AsyncIterator[str]:
    def chunk(k: int, text: str, finish: str | None) -> str:
        choice = {"index": k, "text": text, "logprobs": None, "finish_reason": finish}
        return sse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
            }  # fmt: skip
        )

    try:
        if body.echo:
            for k in range(len(sub.requests)):
                yield chunk(k, sub.engine.tokenizer.decode(prompts[k // body.n]), None)
        async for i, ev in sub.events():
            if ev["type"] == "token" and ev["text"]:
                yield chunk(i, ev["text"], None)
            elif ev["type"] == "finish":
                if ev["finish_reason"] == "error":
                    yield sse(error_body(ev.get("error") or "generation failed", "server_error"))
                    return
                yield chunk(i, "", ev["finish_reason"])
        yield "data: [DONE]\n\n"
    finally:
        sub.close()

"""``POST /v1/embeddings``: one vector per input (``engine.embed``), OpenAI's list format.

Runs on the engine thread between decode steps (``Engine.call``), so it never races a
batch for the model: one job per chunk of ``CHUNK`` tokens (``engine.embed.ChunkedEmbedding``)
within the engine's job budget per step, so running streams keep flowing while a long
embeddings request is served.
``encoding_format: base64`` packs little-endian float32, as the OpenAI client expects;
``dimensions`` truncates and re-normalises (Matryoshka-style).
"""

from __future__ import annotations

import asyncio
import base64

from fastapi.responses import JSONResponse

from folklm.engine.embed import ChunkedEmbedding
from folklm.errors import FolkError
from folklm.serve.protocol import EmbeddingRequest
from folklm.serve.runner import ServedModel

MAX_INPUTS = 256
CHUNK = 64  # tokens per engine job


async def create(body: EmbeddingRequest, served: ServedModel) -> JSONResponse:
    engine = served.engine
    if served.adapter is not None:
        raise FolkError("embeddings are served for base models only")
    x = body.input
    tok = engine.tokenizer
    if isinstance(x, str):
        inputs = [tok.encode(x)]
    elif not x:
        raise FolkError("input must not be empty")
    elif isinstance(x[0], str):
        inputs = [tok.encode(s) for s in x]
    elif isinstance(x[0], int):
        inputs = [list(x)]
    else:
        inputs = [list(i) for i in x]
    if len(inputs) > MAX_INPUTS:
        raise FolkError(f"input: at most {MAX_INPUTS} items, got {len(inputs)}")
    for k, ids in enumerate(inputs):
        if not ids:
            raise FolkError(f"input[{k}] is empty")
        if any(not 0 <= t < engine.vocab for t in ids):
            raise FolkError(f"input[{k}]: token id outside the vocabulary (0..{engine.vocab - 1})")
        engine.check_length(len(ids), 0)
    if body.dimensions is not None and body.dimensions > engine.llm.config.hidden_size:
        raise FolkError(
            f"dimensions={body.dimensions} exceeds the model's {engine.llm.config.hidden_size}"
        )
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future] = []
    for ids in inputs:
        future: asyncio.Future = loop.create_future()
        state = ChunkedEmbedding(engine.model, ids, CHUNK)

        def done(result, error, future=future):
            def settle():
                if future.done() or (result is None and error is None):
                    return
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)

            loop.call_soon_threadsafe(settle)

        for start in range(0, len(ids), CHUNK):  # in order: the engine runs jobs FIFO
            engine.call(state.step, done, tokens=min(CHUNK, len(ids) - start))
        futures.append(future)
    vectors = await asyncio.gather(*futures)
    data = []
    for k, v in enumerate(vectors):
        if body.dimensions is not None:
            v = v[: body.dimensions]
            v = v / v.norm().clamp_min(1e-12)
        if body.encoding_format == "base64":
            value = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
        else:
            value = v.tolist()
        data.append({"object": "embedding", "embedding": value, "index": k})
    n = sum(len(i) for i in inputs)
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": served.name,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }
    )

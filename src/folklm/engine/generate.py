"""Autoregressive generation: prefill once, then one-token decode steps over a static cache.

Prompts of different lengths share a batch through left padding: every row writes the same
cache slot at each step and padding slots are masked out (``cache.KVCache``). The loop body
is the decoding core the server shares: ``ModelRunner`` calls the model, ``Sampler`` picks
the tokens, one ``TextStream`` per row turns them into text and decides the finish.
``generate_stream`` yields, per decode step, the new text of every row.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from folklm.engine.runner import ModelRunner
from folklm.engine.sampler import Sampler
from folklm.engine.text import TextStream
from folklm.errors import FolkError
from folklm.models.llama import CausalLM
from folklm.ops.sampling import SamplingParams
from folklm.tokenizer import Tokenizer


@dataclass
class Completion:
    """One row's result. ``finish_reason``: "stop" (EOS or stop string) or "length".

    ``logprobs`` (with ``SamplingParams.logprobs``): per token, ``{"logprob", "top"}``.
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[dict] | None = None


@dataclass
class Timings:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prompt_tokens: int = 0
    decode_steps: int = 0  # forward passes after prefill
    decode_tokens: int = 0  # tokens those passes produced for unfinished rows
    generated_tokens: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        """Tokens per second of the decode steps alone (forward + sampling)."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


def generate_stream(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_ids: list[int],
    timings: Timings | None = None,
) -> Iterator[list[tuple[int, str, Completion]]]:
    """Generate for a batch; yield after each step a list of (row, new text, completion).

    The final state of every row is in the ``Completion`` objects, which are updated in
    place (text, token_ids, finish_reason, logprobs).
    """
    params.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise FolkError("empty prompt: give at least one token of input")
    config = model.config
    B = len(prompts)
    max_prompt = max(len(p) for p in prompts)
    ctx = config.max_position_embeddings
    if max_prompt + params.max_new_tokens > ctx:
        raise FolkError(
            f"prompt ({max_prompt} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
            f"the model's context of {ctx} tokens"
        )
    timings = timings if timings is not None else Timings()
    results = [Completion(prompt_tokens=len(p)) for p in prompts]
    if params.max_new_tokens == 0:
        for r in results:
            r.finish_reason = "length"
        return
    if params.logprobs is not None:
        for r in results:
            r.logprobs = []
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    runner = ModelRunner(model)
    pad_id = tokenizer.pad_token_id or 0
    ids, cache = runner.static_cache(prompts, max_prompt + params.max_new_tokens, pad_id)
    # the repetition penalty's history: a row's padding repeats its first token (a set)
    history = torch.tensor([[p[0]] * (max_prompt - len(p)) + p for p in prompts])
    sampler = Sampler(params, history, config.vocab_size, generator)
    streams = [
        TextStream(tokenizer, params.stop, eos_ids, params.max_new_tokens, params.ignore_eos)
        for _ in range(B)
    ]
    done = [False] * B

    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = runner.run(ids, cache)  # (B, V)
        token = sampler.sample(logits)  # (B,)
        timings.prefill_seconds += time.perf_counter() - t0
        timings.prompt_tokens += sum(len(p) for p in prompts)
        while True:
            sampler.accept(token)
            info = sampler.logprobs(logits, token)
            events = []
            for b, t in enumerate(token.tolist()):
                if done[b]:
                    continue
                res, stream = results[b], streams[b]
                timings.generated_tokens += 1
                res.token_ids.append(t)
                if info is not None and res.logprobs is not None:
                    res.logprobs.append(info[b])
                out = stream.push(t)
                res.text, res.finish_reason = stream.text, stream.finish_reason
                done[b] = stream.finish_reason is not None
                events.append((b, out, res))
            yield events
            if all(done):
                break
            t0 = time.perf_counter()
            logits = runner.run(token[:, None], cache)
            token = sampler.sample(logits)
            timings.decode_seconds += time.perf_counter() - t0
            timings.decode_steps += 1
            timings.decode_tokens += B - sum(done)


def generate(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_ids: list[int],
    timings: Timings | None = None,
) -> list[Completion]:
    """Run ``generate_stream`` to the end and return each row's completion."""
    results: dict[int, Completion] = {}
    for events in generate_stream(model, tokenizer, prompts, params, eos_ids, timings):
        for b, _, res in events:
            results[b] = res
    if not results:  # max_new_tokens == 0
        return [Completion(prompt_tokens=len(p), finish_reason="length") for p in prompts]
    return [results[b] for b in range(len(prompts))]

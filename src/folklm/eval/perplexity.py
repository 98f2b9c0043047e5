"""Perplexity and bits per byte of a text, with a sliding window.

The method is Hugging Face's "Perplexity of fixed-length models"
(https://huggingface.co/docs/transformers/perplexity): a model that sees at most ``context``
tokens scores a long text in windows that start every ``stride`` tokens; each window scores
only the tokens the previous one did not reach, so every token is scored once, with up to
``context - stride`` tokens of left context (``stride == context``: disjoint chunks whose
first token is not scored, the lower-bound setting). As in that guide, the text is tokenized
as the tokenizer does by default, so the very first token is context only.

Perplexity is ``exp(nll_sum / tokens)``; bits per byte is ``nll_sum / ln 2 / bytes`` where
``bytes`` counts the UTF-8 bytes of the scored tokens: each scored token owns the text from
the end of the previous token to its own end, so bits per byte compares models with
different tokenizers (Gao et al., 2020, "The Pile", arXiv:2101.00027, section 5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from torch import nn

from folklm.errors import FolkError


def _network_and_tokenizer(llm_or_model: Any, tokenizer: Any) -> tuple[nn.Module, Any]:
    if isinstance(llm_or_model, nn.Module):
        net = llm_or_model
    else:
        model = getattr(llm_or_model, "model", None)
        if not isinstance(model, nn.Module):
            raise FolkError(f"cannot evaluate a {type(llm_or_model).__name__}: expected a model")
        net = model
        tokenizer = tokenizer if tokenizer is not None else getattr(llm_or_model, "tokenizer", None)
    if tokenizer is None:
        raise FolkError("perplexity needs a tokenizer: pass the LLM or a tokenizer")
    return net, tokenizer


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and (start, end) character offsets (folklm, ``tokenizers`` or transformers)."""
    backend = getattr(tokenizer, "hf", None) or getattr(tokenizer, "backend_tokenizer", None)
    enc = (backend or tokenizer).encode(text)
    return list(enc.ids), [tuple(o) for o in enc.offsets]


def _max_positions(net: nn.Module) -> int | None:
    config = getattr(net, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over ``n`` tokens.

    Position ``p`` is predicted from positions ``begin .. p-1`` of its window.
    """
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def perplexity(
    llm_or_model: Any,
    tokenizer: Any = None,
    text: str = "",
    *,
    context: int = 1024,
    stride: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
) -> dict[str, float | int]:
    """Perplexity of ``text`` under a causal LM, by the sliding-window method.

    Args:
        llm_or_model: an ``LLM``, a folklm model, or a ``transformers`` causal LM.
        tokenizer: a folklm ``Tokenizer``, a ``tokenizers.Tokenizer`` or a transformers fast
            tokenizer; defaults to the LLM's.
        context: window length in tokens, capped to the model's ``max_position_embeddings``
            (and ``stride`` with it).
        stride: tokens between window starts (1 <= stride <= context).
        max_tokens: score only the first ``max_tokens`` tokens of the text.
        batch_size: windows per forward pass.

    Returns:
        ``perplexity``, ``bits_per_byte``, ``tokens`` (scored), ``bytes`` (their UTF-8 bytes)
        and ``nll_sum`` (total negative log-likelihood, nats).
    """
    net, tokenizer = _network_and_tokenizer(llm_or_model, tokenizer)
    if not isinstance(text, str) or not text.strip():
        raise FolkError("perplexity: the text is empty")
    if not 1 <= stride <= context:
        raise FolkError(f"perplexity: stride must be between 1 and context={context}, got {stride}")
    limit = _max_positions(net)
    if limit and context > limit:  # a shorter model: shorter windows, at most disjoint
        context, stride = limit, min(stride, limit)
    if batch_size < 1:
        raise FolkError(f"perplexity: batch_size must be >= 1, got {batch_size}")
    ids, offsets = _encode_prefix(tokenizer, text, max_tokens)
    if len(ids) < 2:
        raise FolkError(f"perplexity: the text gives {len(ids)} token(s); at least 2 are needed")
    spans = windows(len(ids), context, stride)
    device = next(net.parameters()).device
    tokens = torch.tensor(ids, dtype=torch.long, device=device)
    nll_sum, scored = 0.0, torch.zeros(len(ids), dtype=torch.bool)
    # windows of the same length go through the model together
    groups: list[list[tuple[int, int, int]]] = []
    for span in spans:
        if groups and len(groups[-1]) < batch_size and _len(groups[-1][0]) == _len(span):
            groups[-1].append(span)
        else:
            groups.append([span])
    with _progress(progress, len(groups)) as tick:
        for group in groups:
            batch = torch.stack([tokens[b:e] for b, e, _ in group])  # (B, T)
            out = net(batch)
            logits = out.logits if hasattr(out, "logits") else out  # (B, T, V)
            for row, (b, e, first) in enumerate(group):
                pred = logits[row, first - 1 - b : e - 1 - b].float()  # predicts first .. e-1
                nll_sum += F.cross_entropy(pred, tokens[first:e], reduction="sum").item()
                scored[first:e] = True
            tick()
    n_scored = int(scored.sum())
    n_bytes = _scored_bytes(text, offsets, scored.tolist())
    return {
        "perplexity": math.exp(nll_sum / n_scored),
        "bits_per_byte": nll_sum / math.log(2) / max(n_bytes, 1),
        "tokens": n_scored,
        "bytes": n_bytes,
        "nll_sum": nll_sum,
    }


def _len(span: tuple[int, int, int]) -> int:
    return span[1] - span[0]


def _encode_prefix(tokenizer: Any, text: str, max_tokens: int | None):
    """Encode the text, or, with ``max_tokens``, a prefix long enough to give that many
    tokens unaffected by the cut (tokenizing all of a long corpus costs seconds)."""
    if max_tokens is not None:
        if max_tokens < 2:
            raise FolkError(f"perplexity: max_tokens must be >= 2, got {max_tokens}")
        chars = 16 * max_tokens + 256
        while chars < len(text):
            ids, offsets = _encode(tokenizer, text[:chars])
            if len(ids) > max_tokens + 16:
                return ids[:max_tokens], offsets[:max_tokens]
            chars *= 2
    ids, offsets = _encode(tokenizer, text)
    if max_tokens is not None:
        ids, offsets = ids[:max_tokens], offsets[:max_tokens]
    return ids, offsets


def _scored_bytes(text: str, offsets: list[tuple[int, int]], scored: list[bool]) -> int:
    """UTF-8 bytes owned by the scored tokens (token i owns text[end(i-1):end(i)])."""
    total, prev_end = 0, 0
    for (_, end), is_scored in zip(offsets, scored, strict=True):
        end = max(end, prev_end)  # special tokens have (0, 0)
        if is_scored:
            total += len(text[prev_end:end].encode("utf-8"))
        prev_end = end
    return total


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("perplexity", total=total)
        yield lambda: bar.update(task, advance=1)

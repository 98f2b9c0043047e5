"""Sliding-window perplexity against float64 and ``transformers`` references."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

import folklm
from folklm import datasets
from folklm.errors import FolkError
from folklm.eval import perplexity
from folklm.eval.perplexity import _encode_prefix, windows
from folklm.tokenizer import Tokenizer


def _text(seed: int, n: int) -> str:
    """Random words of the tiny word-level vocabulary (t3 .. t127)."""
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"t{i}" for i in torch.randint(3, 128, (n,), generator=g).tolist())


def _reference_nll(hf64, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """The guide's loop, written out per token in float64: token p of window [begin, end) is
    scored from log_softmax(logits[p - 1 - begin]) if an earlier window did not reach it."""
    n, nll, count, prev_end = ids.numel(), 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        with torch.no_grad():
            logp = torch.log_softmax(hf64(ids[None, begin:end]).logits[0], dim=-1)
        for p in range(max(prev_end, begin + 1), end):
            nll -= logp[p - 1 - begin, ids[p]].item()
            count += 1
        prev_end = end
        if end == n:
            break
    return nll, count


@pytest.mark.parametrize(("context", "stride"), [(32, 8), (32, 20), (48, 47)])
def test_matches_float64_transformers(tiny_models, seed, context, stride):
    hf, folder = tiny_models("llama")
    llm = folklm.load(folder, fast=False, dtype="float32")
    text = _text(seed, 150)
    r = perplexity(llm, None, text, context=context, stride=stride)
    ids = torch.tensor(llm.tokenizer.encode(text))
    nll, count = _reference_nll(copy.deepcopy(hf).double(), ids, context, stride)
    assert r["tokens"] == count == ids.numel() - 1  # every token but the first, once
    assert r["nll_sum"] == pytest.approx(nll, rel=1e-5), f"seed={seed}"
    assert r["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # each scored token owns " tN": all bytes but those of the first word
    first = len(text.split(" ")[0])
    assert r["bytes"] == len(text.encode()) - first
    assert r["bits_per_byte"] == pytest.approx(nll / math.log(2) / r["bytes"], rel=1e-5)


def test_stride_equal_to_context_matches_transformers_chunk_loss(tiny_models, seed):
    hf, folder = tiny_models("llama")
    llm = folklm.load(folder, fast=False, dtype="float32")
    text = _text(seed, 130)  # chunks of 32: 32, 32, 32, 32, 2
    r = perplexity(llm, None, text, context=32, stride=32, batch_size=2)
    ids = torch.tensor([llm.tokenizer.encode(text)])
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, ids.shape[1], 32):
            chunk = ids[:, begin : begin + 32]
            nll += hf(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    assert r["tokens"] == count == 130 - 5  # the first token of each chunk is not scored
    assert r["nll_sum"] == pytest.approx(nll, rel=1e-5), f"seed={seed}"


def test_transformers_model_and_batching_agree(tiny_models, seed):
    hf, folder = tiny_models("llama")
    llm = folklm.load(folder, fast=False, dtype="float32")
    text = _text(seed, 100)
    one = perplexity(llm, None, text, context=24, stride=10)
    three = perplexity(llm.model, llm.tokenizer, text, context=24, stride=10, batch_size=3)
    theirs = perplexity(hf, llm.tokenizer, text, context=24, stride=10)
    assert three["tokens"] == one["tokens"] == theirs["tokens"]
    assert three["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-5), f"seed={seed}"
    assert theirs["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-4), f"seed={seed}"


def test_context_is_capped_to_the_model(tiny_models, seed):
    _, folder = tiny_models("llama")  # max_position_embeddings = 256
    llm = folklm.load(folder, fast=False, dtype="float32")
    text = _text(seed, 300)
    capped = perplexity(llm, None, text, context=10_000, stride=200)
    assert capped == perplexity(llm, None, text, context=256, stride=200)
    # the stride is capped with the context: the defaults (1024, 512) work on short models
    assert perplexity(llm, None, text) == perplexity(llm, None, text, context=256, stride=256)


def test_windows_score_each_token_once(seed):
    rng = random.Random(seed)
    for _ in range(200):
        n, context = rng.randint(2, 300), rng.randint(2, 64)
        stride = rng.randint(1, context)
        spans = windows(n, context, stride)
        counts = [0] * n
        for i, (begin, end, first) in enumerate(spans):
            assert end - begin <= context and begin < first < end or first == begin + 1
            if i > 0 and stride < context:  # at least context - stride tokens of context
                assert first - begin >= min(context - stride, first)
            for p in range(first, end):
                counts[p] += 1
        if stride < context:
            assert counts == [0] + [1] * (n - 1), (seed, n, context, stride)
        else:  # disjoint chunks: all but each chunk's first token
            assert counts == [int(p % context != 0) for p in range(n)], (seed, n, context)


def test_bits_per_byte_counts_utf8_bytes(bpe_models):
    """A byte-level BPE tokenizer splits multi-byte characters; bytes are still exact."""
    llm = folklm.load(bpe_models("llama"), fast=False, dtype="float32")
    text = "Café — naïve señor, ¿qué tal? Ünïcödé 😀 text, then more words. " * 4
    r = perplexity(llm, None, text, context=40, stride=16)
    ids = llm.tokenizer.encode(text)
    end0 = llm.tokenizer.hf.encode(text).offsets[0][1]
    assert r["tokens"] == len(ids) - 1
    assert r["bytes"] == len(text.encode("utf-8")) - len(text[:end0].encode("utf-8"))
    assert r["bits_per_byte"] == pytest.approx(r["nll_sum"] / math.log(2) / r["bytes"])


def test_max_tokens_uses_a_prefix_of_the_text(bpe_models):
    tok = Tokenizer.from_folder(bpe_models("llama"))
    text = datasets.read_text("tinyshakespeare/input.txt")
    ids, offsets = _encode_prefix(tok, text, 500)
    full = tok.hf.encode(text[:20000])
    assert ids == full.ids[:500] and offsets == [tuple(o) for o in full.offsets[:500]]
    llm = folklm.load(bpe_models("llama"), fast=False, dtype="float32")
    assert perplexity(llm, None, text, context=64, stride=32, max_tokens=300)["tokens"] == 299


def test_bad_input(tiny_models):
    _, folder = tiny_models("llama")
    llm = folklm.load(folder, fast=False, dtype="float32")
    for kwargs, match in [
        ({"text": "  "}, "empty"),
        ({"text": "t5"}, "at least 2"),
        ({"text": "t5 t6", "stride": 0}, "stride"),
        ({"text": "t5 t6", "context": 8, "stride": 9}, "stride"),
        ({"text": "t5 t6", "max_tokens": 1}, "max_tokens"),
        ({"text": "t5 t6", "batch_size": 0}, "batch_size"),
    ]:
        with pytest.raises(FolkError, match=match) as e:
            perplexity(llm, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(FolkError, match="tokenizer"):
        perplexity(llm.model, None, "t5 t6")

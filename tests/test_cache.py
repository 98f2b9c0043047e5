"""The cache protocol: every cache gives the logits of a full forward pass.

Each implementation -- the static ``KVCache`` (left-padded rows, ``fork``ed prefixes) and
the server's slot cache (one slot's prefill, a decode step of rows at different lengths)
-- is fed prefill, chunks and single tokens; every real token's logits must equal those of
the whole sequence run without a cache. Mistral's window (6) is shorter than the
sequences, so the window masks are checked too.
"""

from __future__ import annotations

import pytest
import torch

import folklm
from folklm.cache import Cache, KVCache
from folklm.engine.slots import SlotCache

FAMILIES = [
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "mistral_nemo",
    "olmo2",
    "qwen3_moe",
]
LENGTHS = [23, 15, 9]  # rows at different lengths


def full_logits(llm, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return llm.model(torch.tensor([seq]))[0]  # (T, V)


def close(a, b, what):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_left_padded_rows_prefill_chunk_and_single_tokens(tiny_models, family):
    _, folder = tiny_models(family)
    llm = folklm.load(folder, dtype="float32")
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in LENGTHS]
    L = max(LENGTHS)
    pad = torch.tensor([L - n for n in LENGTHS])
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, L - len(s) :] = torch.tensor(s)
    cache: Cache = KVCache(llm.config, len(seqs), L, torch.float32, pad=pad)
    with torch.no_grad():
        parts = [llm.model(ids[:, :16], cache)]  # prefill (padding inside), a chunk, 1 by 1
        parts.append(llm.model(ids[:, 16:19], cache))
        parts += [llm.model(ids[:, t : t + 1], cache) for t in range(19, L)]
    got = torch.cat(parts, dim=1)  # (B, L, V)
    for b, s in enumerate(seqs):
        close(got[b, L - len(s) :], full_logits(llm, s), f"{family} row {b}")


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_forked_prefixes_continue_like_the_full_sequence(tiny_models, family):
    _, folder = tiny_models(family)
    llm = folklm.load(folder, dtype="float32")
    g = torch.Generator().manual_seed(1)
    ctxs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (11, 5)]
    L = 11
    ids = torch.zeros(2, L, dtype=torch.long)
    for b, c in enumerate(ctxs):
        ids[b, L - len(c) :] = torch.tensor(c)
    cache = KVCache(llm.config, 2, L, torch.float32, pad=torch.tensor([0, 6]))
    conts = torch.randint(3, 128, (3, 7), generator=g)  # rows: ctx 0, ctx 1, ctx 1 again
    rows = torch.tensor([0, 1, 1])
    with torch.no_grad():
        llm.model(ids, cache, logits="last")
        big = cache.fork(rows, L + 7)
        got = llm.model(conts, big)  # (3, 7, V)
    for r, c in enumerate(rows.tolist()):
        seq = ctxs[c] + conts[r].tolist()
        close(got[r], full_logits(llm, seq)[len(ctxs[c]) :], f"{family} fork row {r}")


@pytest.mark.parametrize("family", FAMILIES)
def test_slot_cache_prefill_then_decode_rows_at_different_lengths(tiny_models, family):
    _, folder = tiny_models(family)
    llm = folklm.load(folder, dtype="float32")
    g = torch.Generator().manual_seed(2)
    total = 30
    seqs = [torch.randint(3, 128, (total,), generator=g).tolist() for _ in range(3)]
    prompt_lens = [14, 4, 9]
    cache = SlotCache(llm.config, 4, 64, torch.float32, 1 << 30)
    got: list[list[torch.Tensor]] = [[], [], []]
    with torch.no_grad():
        for b, n in enumerate(prompt_lens):
            slot, cached = cache.acquire(seqs[b][:n], total, f"t{b}", reuse=False)
            assert (slot, cached) == (b, 0)
            half = n // 2  # prefill in two chunks: the second continues a cached prefix
            got[b].append(llm.model(torch.tensor([seqs[b][:half]]), cache.view(slot))[0])
            got[b].append(llm.model(torch.tensor([seqs[b][half:n]]), cache.view(slot))[0])
            assert cache.lengths[slot] == n
        cache.release(1)  # slot 1 leaves: a hole in the decode batch
        live = [0, 2]
        for _ in range(total - max(prompt_lens)):
            view = cache.decode_view(live)
            x = torch.zeros(len(view.positions), 1, dtype=torch.long)
            for r in live:
                x[r, 0] = seqs[r][cache.lengths[r]]
            logits = llm.model(x, view)  # (rows, 1, V)
            for r in live:
                got[r].append(logits[r])
    for r in live:
        seq = seqs[r]
        mine = torch.cat(got[r])
        close(mine, full_logits(llm, seq)[: len(mine)], f"{family} slot {r}")
    close(torch.cat(got[1]), full_logits(llm, seqs[1])[:4], f"{family} slot 1")

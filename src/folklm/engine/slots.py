"""Slot-based KV cache for continuous batching, with prefix reuse and a memory budget.

Every running request owns one *slot*: a row of per-layer buffers shaped
(rows, n_kv_heads, capacity, head_dim). Rows sit at different lengths, so a decode step
writes each row's key/value at its own position and attends through a per-row length mask
(the "iteration-level scheduling" of Orca, Yu et al., OSDI 2022). The buffers grow on
demand (more rows, longer capacity) within a byte budget, and shrink back when the server
is idle, so a burst of load does not keep its memory.

Prefix caching: a slot remembers the token ids whose keys/values it holds, also after its
request has finished. A new prompt that starts with the same tokens (a shared system
prompt, the earlier turns of a conversation) takes over that free slot, or copies the
prefix from a busy one, and prefills only the rest -- the idea of vLLM's automatic prefix
caching (Kwon et al., SOSP 2023) at slot granularity.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from folklm.cache import Feed, Window
from folklm.config import ModelConfig
from folklm.ops.attention import build_mask, build_row_masks


class SlotPrefill:
    """The ``Cache`` of one slot (a batch of 1) continuing its cached prefix."""

    def __init__(self, cache: SlotCache, slot: int):
        self.cache, self.slot = cache, slot
        self.k = [k[slot : slot + 1] for k in cache.k]
        self.v = [v[slot : slot + 1] for v in cache.v]
        self.length = cache.lengths[slot]

    def feed(self, T: int, windows: Sequence[Window]) -> Feed:
        start = self.length
        positions = torch.arange(start, start + T)[None, :]  # (1, T)
        return Feed(positions, {w: build_mask(start, T, start + T, None, w) for w in windows})

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n
        self.cache.lengths[self.slot] = self.length


class SlotDecode:
    """The ``Cache`` of a decode step: rows ``0..hi-1`` take one token each, every row at
    its own length; ``rows`` are the running ones (the others are holes whose writes land
    at a harmless slot)."""

    def __init__(self, cache: SlotCache, rows: list[int]):
        self.cache, self.rows = cache, rows
        hi = max(rows) + 1
        top = max(cache.lengths[r] for r in rows)
        for r in set(range(hi)) - set(rows):  # a hole's garbage write must not hit a prefix
            if cache.lengths[r] > top:
                cache.lengths[r] = top
                cache.tokens[r] = cache.tokens[r][:top]
        positions = torch.full((hi,), top, dtype=torch.long)
        positions[rows] = torch.tensor([cache.lengths[r] for r in rows], dtype=torch.long)
        self.positions = positions  # (hi,) slot written by each row
        self.span = top + 1  # keys attended over
        self.k = [k[:hi] for k in cache.k]
        self.v = [v[:hi] for v in cache.v]
        self._index = torch.arange(hi)

    def feed(self, T: int, windows: Sequence[Window]) -> Feed:
        if T != 1:
            raise ValueError(f"a decode step feeds one token per row, got {T}")
        return Feed(self.positions[:, None], build_row_masks(self.positions, self.span, windows))

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (hi, n_kv, 1, D) -> written at (row, :, positions[row])
        self.k[layer][self._index, :, self.positions] = k[:, :, 0]
        self.v[layer][self._index, :, self.positions] = v[:, :, 0]
        return self.k[layer][:, :, : self.span], self.v[layer][:, :, : self.span]

    def advance(self, n: int) -> None:
        for r in self.rows:
            self.cache.lengths[r] += n


class SlotCache:
    """Per-layer key/value rows, their lengths and the tokens they hold.

    Args:
        config: the model's config (layers, kv heads, head dim).
        max_rows: most concurrent sequences (the batch limit).
        max_len: most tokens one sequence may hold (prompt + completion).
        dtype: cache dtype (the model's).
        budget_bytes: most bytes the key/value buffers may take together.
    """

    def __init__(
        self,
        config: ModelConfig,
        max_rows: int,
        max_len: int,
        dtype: torch.dtype,
        budget_bytes: int,
    ):
        self.config = config
        self.max_rows = max_rows
        self.max_len = max_len
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        elem = torch.empty((), dtype=dtype).element_size()
        self.bytes_per_token = (
            2 * config.num_hidden_layers * config.kv_heads * config.head_size * elem
        )
        self.rows = 0
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lengths: list[int] = []
        self.tokens: list[list[int]] = []  # the ids whose k/v each row holds
        self.tags: list[str | None] = []  # adapter of the row: prefixes only match the same
        self.busy: list[bool] = []
        self.last_used: list[int] = []
        self._clock = 0
        self._realloc(0, 0, [])

    # -- memory ---------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self.rows * self.capacity * self.bytes_per_token

    def fits(self, need_len: int) -> bool:
        """Whether one sequence of ``need_len`` tokens can ever fit the budget and limits."""
        return need_len <= self.max_len and need_len * self.bytes_per_token <= self.budget_bytes

    def _realloc(self, rows: int, capacity: int, keep: list[int]) -> None:
        """New buffers of (rows, capacity); row ``keep[i]`` moves to row i."""
        c = self.config
        shape = (rows, c.kv_heads, capacity, c.head_size)
        new_k = [torch.zeros(shape, dtype=self.dtype) for _ in range(c.num_hidden_layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype) for _ in range(c.num_hidden_layers)]
        meta = []
        for dst, src in enumerate(keep):
            n = min(self.lengths[src], capacity)
            for layer in range(c.num_hidden_layers):
                new_k[layer][dst, :, :n] = self.k[layer][src, :, :n]
                new_v[layer][dst, :, :n] = self.v[layer][src, :, :n]
            meta.append(
                (n, self.tokens[src][:n], self.tags[src], self.busy[src], self.last_used[src])
            )
        meta += [(0, [], None, False, 0)] * (rows - len(keep))
        self.k, self.v = new_k, new_v
        self.rows, self.capacity = rows, capacity
        self.lengths = [m[0] for m in meta]
        self.tokens = [m[1] for m in meta]
        self.tags = [m[2] for m in meta]
        self.busy = [m[3] for m in meta]
        self.last_used = [m[4] for m in meta]

    def _grow(self, rows: int, capacity: int) -> bool:
        rows, capacity = max(rows, self.rows), max(capacity, self.capacity)
        if rows == self.rows and capacity == self.capacity:
            return True
        if rows > self.max_rows or capacity > self.max_len:
            return False
        # grow in steps (doubling, capped) so that a stream of arrivals reallocates rarely
        step_rows = min(self.max_rows, max(rows, 2 * self.rows)) if rows > self.rows else rows
        step_cap = (
            min(self.max_len, max(capacity, 2 * self.capacity))
            if capacity > self.capacity
            else capacity
        )
        for r, c in ((step_rows, step_cap), (rows, capacity)):
            if r * c * self.bytes_per_token <= self.budget_bytes:
                self._realloc(r, c, list(range(self.rows)))
                return True
        return False

    def shrink(self, keep_prefixes: int) -> None:
        """Release memory when nothing runs: keep the ``keep_prefixes`` freshest rows."""
        if any(self.busy):
            return
        order = sorted(
            (r for r in range(self.rows) if self.lengths[r] > 0),
            key=lambda r: -self.last_used[r],
        )[:keep_prefixes]
        capacity = max((self.lengths[r] for r in order), default=0)
        if len(order) == self.rows and capacity == self.capacity:
            return
        self._realloc(len(order), capacity, order)
        _return_freed_memory()

    # -- slots ----------------------------------------------------------------------------
    def acquire(self, prompt: list[int], need_len: int, tag: str | None, reuse: bool):
        """Take a slot for a sequence of up to ``need_len`` tokens starting with ``prompt``.

        Returns (slot, n_cached) -- the first ``n_cached`` prompt tokens already hold their
        keys/values -- or None when no slot or memory is free right now.
        """
        best_row, best_n = None, 0
        if reuse:
            for r in range(self.rows):
                if self.tags[r] != tag or self.lengths[r] == 0:
                    continue
                n = _common_prefix(self.tokens[r], prompt, len(prompt) - 1)  # >= 1 to prefill
                if n > best_n:
                    best_row, best_n = r, n
        free = [r for r in range(self.rows) if not self.busy[r]]
        if best_row is not None and not self.busy[best_row]:
            slot = best_row  # take over the finished sequence's slot and its prefix
        elif free:
            # the free row whose content is least useful: empty first, then least recent
            slot = min(free, key=lambda r: (self.lengths[r] > 0, self.last_used[r]))
        else:
            slot = self.rows
        if not self._grow(slot + 1, need_len):
            return None
        if slot != best_row:
            if best_row is not None and best_n > 0:
                for layer in range(self.config.num_hidden_layers):
                    self.k[layer][slot, :, :best_n] = self.k[layer][best_row, :, :best_n]
                    self.v[layer][slot, :, :best_n] = self.v[layer][best_row, :, :best_n]
                self.tokens[slot] = list(prompt[:best_n])
            else:
                best_n = 0
        self.tokens[slot] = self.tokens[slot][:best_n]
        self.lengths[slot] = best_n
        self.tags[slot] = tag
        self.busy[slot] = True
        self._clock += 1
        self.last_used[slot] = self._clock
        return slot, best_n

    def release(self, slot: int, keep: bool = True) -> None:
        """Free a slot at once; its tokens stay as a reusable prefix unless ``keep`` is off."""
        self.busy[slot] = False
        if not keep:
            self.lengths[slot] = 0
            self.tokens[slot] = []

    def view(self, slot: int) -> SlotPrefill:
        """The cache for prefilling ``slot`` after its ``lengths[slot]`` cached tokens."""
        return SlotPrefill(self, slot)

    def decode_view(self, rows: list[int]) -> SlotDecode:
        """The cache for one decode step of the running ``rows``."""
        return SlotDecode(self, rows)

    @property
    def running(self) -> int:
        return sum(self.busy)


def _return_freed_memory() -> None:
    """Ask glibc to give freed heap pages back to the system (its threshold for doing so on
    its own rises after large frees), so RSS falls back after a burst of load."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y or n >= limit:
            break
        n += 1
    return n

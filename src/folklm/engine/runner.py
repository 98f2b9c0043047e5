"""The model runner: input tensors in, logits out, over any ``folklm.cache.Cache``.

It is the one place that calls the model while decoding: ``generate_stream`` (the CLI, the
Python API, evaluation) and the server's engine both go through it. It builds the token
tensors (left-padding a batch of prompts for the static cache), selects per-row LoRA
adapters for the call when the server has a ``MultiLoRA``, and asks the model for the
logits of the last position only unless all are wanted (prompt logprobs).
"""

from __future__ import annotations

import torch

from folklm.cache import Cache, KVCache
from folklm.engine import native_step
from folklm.engine.multilora import MultiLoRA
from folklm.models.llama import CausalLM


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids with each prompt right-aligned, and (B,) the padding of each row."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([T - len(p) for p in prompts], dtype=torch.long)
    return ids, pad


class ModelRunner:
    """Calls ``model`` over a cache, with the adapter rows of a ``MultiLoRA`` set for it."""

    def __init__(self, model: CausalLM, lora: MultiLoRA | None = None):
        self.model = model
        self.lora = lora
        self.config = model.config
        self.dtype = next(model.parameters()).dtype
        self.native = native_step.for_model(model)  # the compiled decode step, if any

    def static_cache(
        self, prompts: list[list[int]], max_len: int, pad_id: int
    ) -> tuple[torch.Tensor, KVCache]:
        """Left-padded ids (B, T) of ``prompts`` and a ``KVCache`` with room for max_len."""
        ids, pad = left_pad(prompts, pad_id)
        return ids, KVCache(self.config, len(prompts), max_len, self.dtype, pad=pad)

    def run(
        self,
        ids: torch.Tensor,
        cache: Cache,
        adapters: list[int] | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Feed ids (B, T) through the model; logits (B, V), or (B, T, V) with all_logits.

        ``adapters``: the ``MultiLoRA`` index of each row (0 = the base model).
        """
        step = self.native
        if step is not None and not step.current():  # the model changed since: a new step
            step = self.native = native_step.for_model(self.model)
        if (
            step is not None
            and not all_logits
            and ids.shape[1] == 1
            and (self.lora is None or not any(adapters or ()))
            and step.accepts(cache)
            and not step.hooked()
        ):
            return step.decode(ids[:, 0], cache)  # type: ignore[arg-type]  # accepts() checked
        if self.lora is not None and adapters is not None:
            self.lora.set_rows(adapters)
        try:
            if all_logits:
                return self.model(ids, cache)
            return self.model(ids, cache, logits="last")[:, -1]
        finally:
            if self.lora is not None and adapters is not None:
                self.lora.set_rows([])  # other callers of the model see the base

    def prefill(
        self, ids: list[int], cache: Cache, adapter: int = 0, all_logits: bool = False
    ) -> torch.Tensor:
        """One sequence's uncached prompt tokens: logits (1, V), or (1, T, V)."""
        x = torch.tensor([ids], dtype=torch.long)  # (1, T)
        return self.run(x, cache, [adapter], all_logits)

    def decode(
        self, rows: list[int], tokens: list[int], adapters: list[int], cache: Cache, n_rows: int
    ) -> torch.Tensor:
        """One token for each of ``rows`` (a batch of ``n_rows``, holes included):
        logits (n_rows, V); row r's token and adapter are ``tokens[i]``, ``adapters[i]``."""
        x = torch.zeros(n_rows, dtype=torch.long)
        index = [0] * n_rows
        for r, t, a in zip(rows, tokens, adapters, strict=True):
            x[r] = t
            index[r] = a
        return self.run(x[:, None], cache, index)

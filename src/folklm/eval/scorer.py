"""Batched log-likelihood scoring with a shared, cached context; generation for eval tasks.

Requests are lm-evaluation-harness's: ``(context, continuation)`` strings, tokenized as its
``_encode_pair`` does (trailing context spaces move to the continuation; the continuation's
tokens are those of ``context + continuation`` past the context's own tokens; an empty
context is the BOS token), scored as ``sum log p(continuation | context)`` plus whether the
continuation is the greedy one. Rolling log-likelihood splits a document into the
harness's disjoint windows (``get_rolling_token_windows`` with ``context_len=1``).

Speed, the same numbers: the options of a multiple-choice question share their context, so
the context goes through the model once (phase 1, KV cache filled, LM head on its last
position only) and each continuation is scored from a copy of the cached prefix (phase 2).
Contexts are sorted by length and batched, left-padded, so little padding is computed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from folklm.cache import KVCache
from folklm.engine.generate import generate
from folklm.engine.llm import LLM
from folklm.errors import FolkError
from folklm.models.llama import CausalLM
from folklm.ops.sampling import SamplingParams

Pair = tuple[list[int], list[int]]


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[Pair]:
    """Disjoint (context, continuation) windows scoring every token once, each with as
    much left context as fits in ``max_len`` (the harness's rolling windows)."""
    out: list[Pair] = []
    if not tokens:
        return out
    first = min(max_len, len(tokens))
    out.append(([prefix], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        ctx = tokens[max(end - max_len - 1, 0) : end - 1]
        out.append((ctx[: len(ctx) - (n - 1)], tokens[end - n : end]))
        done = end
    return out


class Scorer:
    """Scores requests with a folklm model (an ``LLM``: ``.model`` and ``.tokenizer``)."""

    def __init__(self, llm: LLM, batch_size: int = 16, max_length: int | None = None):
        if batch_size < 1:
            raise FolkError(f"batch size must be >= 1, got {batch_size}")
        self.llm = llm
        model = llm.model
        assert isinstance(model, CausalLM)  # load() builds every architecture as a CausalLM
        self.model = model
        self.tokenizer = llm.tokenizer
        self.batch_size = batch_size
        config = self.model.config
        positions = getattr(config, "max_position_embeddings", 2048)
        self.max_length = int(max_length or positions)
        bos = self.tokenizer.bos_token_id
        self._prefix_token = bos if bos is not None else self.tokenizer.eos_token_id
        self.dtype = next(self.model.parameters()).dtype

    @property
    def prefix_token(self) -> int:
        """The token a sequence starts with (BOS, else EOS): the first one's context."""
        if self._prefix_token is None:
            raise FolkError("the tokenizer has no BOS or EOS token to start a sequence with")
        return self._prefix_token

    # -- tokenization ---------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_pair(self, context: str, continuation: str) -> Pair:
        if context == "":
            cont = self.encode(continuation)
            if cont and cont[0] == self.prefix_token:
                return cont[:1], cont[1:]
            return [self.prefix_token], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    # -- public API ------------------------------------------------------------------------
    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], progress: Callable[[int], None] | None = None
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) per request."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests], progress)

    def loglikelihood_rolling(
        self, texts: Sequence[str], progress: Callable[[int], None] | None = None
    ) -> list[float]:
        """Log-likelihood of each whole text (every token scored once)."""
        pairs, owner = [], []
        for i, text in enumerate(texts):
            for pair in rolling_windows(self.encode(text), self.prefix_token, self.max_length):
                pairs.append(pair)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (ll, _) in zip(owner, self.loglikelihood_tokens(pairs, progress), strict=True):
            totals[i] += ll
        return totals

    @torch.no_grad()
    def loglikelihood_tokens(
        self, pairs: Sequence[Pair], progress: Callable[[int], None] | None = None
    ) -> list[tuple[float, bool]]:
        """Score token-level (context, continuation) pairs; identical contexts run once."""
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise FolkError(f"request {i}: the continuation has no tokens")
            if not ctx:
                raise FolkError(f"request {i}: the context has no tokens")
            groups[tuple(self._truncate(ctx, cont))].append(i)
        # longest first, as the harness sorts: memory trouble shows at once
        order = sorted(groups, key=lambda c: -(len(c) + max(len(pairs[i][1]) for i in groups[c])))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        batch: list[tuple[int, ...]] = []
        rows = 0
        for key in order:
            n = len(groups[key])
            if batch and rows + n > self.batch_size:
                self._score_batch(batch, groups, pairs, results)
                if progress:
                    progress(rows)
                batch, rows = [], 0
            batch.append(key)
            rows += n
        if batch:
            self._score_batch(batch, groups, pairs, results)
            if progress:
                progress(rows)
        done = [r for r in results if r is not None]
        assert len(done) == len(results)  # every request belongs to one scored batch
        return done

    def _truncate(self, ctx: list[int], cont: list[int]) -> list[int]:
        """Left-truncate so that context + continuation - 1 fits the model's positions."""
        room = self.max_length + 1 - len(cont)
        if room < 1:
            raise FolkError(
                f"a continuation of {len(cont)} tokens does not fit {self.max_length} positions"
            )
        return ctx[-room:]

    def _score_batch(self, ctxs, groups, pairs, results) -> None:
        G, L = len(ctxs), max(len(c) for c in ctxs)
        pad_id = self.prefix_token
        ids = torch.full((G, L), pad_id, dtype=torch.long)
        pads = []
        for g, c in enumerate(ctxs):
            ids[g, L - len(c) :] = torch.tensor(c)
            pads.append(L - len(c))
        # phase 1: the contexts, once each; logits of the last position predict token 1
        cache = KVCache(self.llm.config, G, L, self.dtype, pad=torch.tensor(pads))
        first = torch.log_softmax(self.model(ids, cache, logits="last")[:, -1], dim=-1)

        rows = [(g, i) for g, c in enumerate(ctxs) for i in groups[c]]
        T = max(len(pairs[i][1]) for _, i in rows) - 1  # continuation tokens fed in phase 2
        R = len(rows)
        row_g = torch.tensor([g for g, _ in rows])
        later: torch.Tensor | None = None
        starts = torch.zeros(0, dtype=torch.long)
        if T > 0:
            # phase 2: every continuation from a copy of its context's cached prefix
            big = cache.fork(row_g, L + T)
            x = torch.full((R, T), pad_id, dtype=torch.long)
            for r, (_, i) in enumerate(rows):
                cont = pairs[i][1][:-1]
                if cont:
                    x[r, : len(cont)] = torch.tensor(cont)
            # the LM head and softmax only where a continuation token is predicted: rows
            # are padded to the longest continuation, often twice the others
            lengths = torch.tensor([len(pairs[i][1]) - 1 for _, i in rows])  # (R,)
            valid = torch.arange(T)[None, :] < lengths[:, None]  # (R, T)
            h = self.model.hidden_states(x, big)[valid]  # (n valid, C)
            later = torch.log_softmax(self.model.lm_head(h).float(), dim=-1)  # (n valid, V)
            starts = torch.cumsum(lengths, 0) - lengths  # row r's first row in ``later``
        for r, (g, i) in enumerate(rows):
            cont = pairs[i][1]
            target = torch.tensor(cont)
            lp = [first[g]]
            if len(cont) > 1:
                assert later is not None  # T > 0: phase 2 ran
                start = int(starts[r])
                lp.append(later[start : start + len(cont) - 1])
            logp = torch.cat([t.reshape(-1, first.shape[-1]) for t in lp])  # (len(cont), V)
            ll = logp.gather(1, target[:, None]).sum().item()
            greedy = bool((logp.argmax(-1) == target).all())
            results[i] = (ll, greedy)

    # -- generation ------------------------------------------------------------------------
    def generate(
        self,
        contexts: Sequence[str],
        until: Sequence[str],
        max_gen_tokens: int = 256,
        progress: Callable[[int], None] | None = None,
        **sampling: Any,
    ) -> list[str]:
        """Continuation of each context (greedy unless ``sampling`` holds other
        ``SamplingParams`` fields), cut at the first stop string."""
        sampling = {"temperature": 0.0, **sampling}
        params = SamplingParams(max_new_tokens=max_gen_tokens, stop=list(until), **sampling)
        room = max(self.max_length - max_gen_tokens, 1)
        encoded = [self.encode(c)[-room:] for c in contexts]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        out: list[str] = [""] * len(encoded)
        eos = self.llm.eos_token_ids
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            done = generate(self.model, self.tokenizer, [encoded[i] for i in idx], params, eos)
            for i, res in zip(idx, done, strict=True):
                out[i] = res.text  # cut before the first stop string by the text stream
            if progress:
                progress(len(idx))
        return out

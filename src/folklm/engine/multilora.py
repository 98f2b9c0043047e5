"""Many LoRA adapters on one base model, mixed row by row in the same batch.

Each adaptable projection (q/k/v, o, gate/up, down -- fused or not) is wrapped so that
``y = x W^T + s * (x A_i^T) B_i^T`` where ``i`` is the adapter of the row: the A and B
matrices of every loaded adapter sit stacked in one table per projection, index 0 all
zeros (the base model), and a step gathers each row's pair -- the batched LoRA of S-LoRA
(Sheng et al., 2023, arXiv:2311.03285) and Punica (Chen et al., 2023, arXiv:2310.18547)
in plain ``bmm``. Ranks are zero-padded to the largest loaded rank, which changes no
result. Adapters are read with ``checkpoint.peft`` (the PEFT format), load on demand and
are evicted least-recently-used when the table is full and they are idle.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from torch import nn

from folklm.checkpoint.peft import load_adapter
from folklm.errors import FolkError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class _Rows:
    """What the wrappers read during a forward pass: the adapter index of each row."""

    def __init__(self) -> None:
        self.index = torch.zeros(1, dtype=torch.long)
        self.active = False


class LoRARowsLinear(nn.Module):
    """A (possibly fused, packed) linear plus per-row LoRA deltas from a stacked table."""

    def __init__(self, base: nn.Module, parts: list[tuple[str, int]], slots: int, rows: _Rows):
        super().__init__()
        self.base = base
        self.parts = parts  # (full module name, out features), in output order
        self.offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for name, n in parts:
            self.offsets[name] = (off, n)
            off += n
        # every adaptable projection (nn.Linear, engine.fast's PackedLinear, the quantized
        # linears of folklm.kernels) has an int ``in_features``
        self.out_features, self.in_features = off, cast(int, base.in_features)
        self.slots = slots
        self.rows = rows
        self.rank = 0
        self.A: torch.Tensor | None = None  # (slots, rank, in)
        self.B: torch.Tensor | None = None  # (slots, out, rank), scaling folded in

    def _ensure_rank(self, r: int, dtype: torch.dtype) -> None:
        if r <= self.rank:
            return
        A = torch.zeros(self.slots, r, self.in_features, dtype=dtype)
        B = torch.zeros(self.slots, self.out_features, r, dtype=dtype)
        if self.A is not None and self.B is not None:  # set together
            A[:, : self.rank] = self.A
            B[:, :, : self.rank] = self.B
        self.A, self.B, self.rank = A, B, r

    def load(
        self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
    ) -> None:
        """Put one adapter's (A, s * B) per part into ``slot`` (zeros where it has none).

        The parts of a fused layer (q/k/v) have their own A: they are stacked along the
        rank and B is block-diagonal, so one pair of ``bmm`` computes every part exactly.
        """
        if not weights and self.A is None:
            return
        self._ensure_rank(sum(a.shape[0] for a, _ in weights.values()), dtype)
        A, B = self.A, self.B
        assert A is not None and B is not None  # there are weights, or an earlier adapter's
        A[slot].zero_()
        B[slot].zero_()
        r0 = 0
        for name, (a, b) in weights.items():
            off, n = self.offsets[name]
            r = a.shape[0]
            A[slot, r0 : r0 + r] = a.to(dtype)  # (r, in)
            B[slot, off : off + n, r0 : r0 + r] = b.to(dtype)  # (out_part, r)
            r0 += r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.rows.active or self.A is None or self.B is None:  # A and B: set together
            return y
        idx = self.rows.index
        A = self.A[idx]  # (B, r, in)
        B = self.B[idx]  # (B, out, r)
        return y + torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))


class MultiLoRA:
    """Wraps a model's projections; loads adapters by name into a bounded LRU table.

    Args:
        model: the base model (plain or ``engine.fast``-packed).
        resolve: adapter name -> PEFT adapter folder.
        max_loaded: adapters resident at once (ten fine-tunes: one base model of memory).
    """

    def __init__(self, model: nn.Module, resolve: Callable[[str], Path], max_loaded: int = 8):
        self.resolve = resolve
        self.max_loaded = max_loaded
        self.dtype = next(model.parameters()).dtype
        self.rows = _Rows()
        self.wrappers: dict[str, LoRARowsLinear] = {}  # part name -> wrapper
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                names = FUSED.get(child_name, (child_name,) if child_name in TARGETS else ())
                parts = getattr(child, "parts", None)  # engine.fast.PackedLinear's
                if len(names) > 1 and (parts is None or len(parts) != len(names)):
                    names = (child_name,)  # fused in the checkpoint itself (Phi-3's qkv_proj)
                if not names or not hasattr(child, "in_features"):
                    continue
                prefix = f"{parent_name}." if parent_name else ""
                outs = _part_sizes(child, len(names))
                parts = [(prefix + n, o) for n, o in zip(names, outs, strict=True)]
                wrapper = LoRARowsLinear(child, parts, max_loaded + 1, self.rows)
                setattr(parent, child_name, wrapper)
                for name, _ in parts:
                    self.wrappers[name] = wrapper
        self.loaded: OrderedDict[str, int] = OrderedDict()  # name -> table slot (1..)
        self.refs: dict[str, int] = {}

    def check(self, name: str) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Read and validate adapter ``name``: its (A, s * B) pairs grouped by wrapper."""
        adapter = load_adapter(self.resolve(name))
        cfg = adapter.config
        if cfg.use_dora:
            raise FolkError(f"adapter '{name}': DoRA adapters cannot be mixed per row; fuse it")
        if cfg.modules_to_save or cfg.bias != "none":
            raise FolkError(f"adapter '{name}': modules_to_save / LoRA biases are not served")
        per_wrapper: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for module, w in adapter.layers.items():
            wrapper = self.wrappers.get(module)
            if wrapper is None:
                raise FolkError(f"adapter '{name}': module '{module}' is not a servable target")
            off, n = wrapper.offsets[module]
            if w.A.shape[1] != wrapper.in_features or w.B.shape[0] != n:
                raise FolkError(
                    f"adapter '{name}': '{module}' lora_A {tuple(w.A.shape)} / lora_B "
                    f"{tuple(w.B.shape)} do not fit the base layer ({wrapper.in_features} -> {n})"
                )
            per_wrapper.setdefault(id(wrapper), {})[module] = (w.A, cfg.scaling * w.B)
        return per_wrapper

    def _load(self, name: str, slot: int) -> None:
        per_wrapper = self.check(name)
        for wrapper in {id(w): w for w in self.wrappers.values()}.values():
            wrapper.load(slot, per_wrapper.get(id(wrapper), {}), self.dtype)

    def acquire(self, name: str) -> int | None:
        """Table slot of adapter ``name`` (loaded on demand), or None if all are busy."""
        if name in self.loaded:
            self.loaded.move_to_end(name)
        else:
            used = set(self.loaded.values())
            free = [s for s in range(1, self.max_loaded + 1) if s not in used]
            if not free:
                idle = [n for n in self.loaded if not self.refs.get(n)]
                if not idle:
                    return None
                free = [self.loaded.pop(idle[0])]
            self._load(name, free[0])
            self.loaded[name] = free[0]
        self.refs[name] = self.refs.get(name, 0) + 1
        return self.loaded[name]

    def release(self, name: str) -> None:
        self.refs[name] = max(0, self.refs.get(name, 0) - 1)

    def index_of(self, name: str | None) -> int:
        return 0 if name is None else self.loaded[name]

    def set_rows(self, rows: list[int]) -> None:
        self.rows.index = torch.tensor(rows, dtype=torch.long)
        self.rows.active = any(rows)


def _part_sizes(module: nn.Module, n_parts: int) -> list[int]:
    parts = getattr(module, "parts", None)  # engine.fast.PackedLinear
    if parts is not None and len(parts) == n_parts:
        return [n for _, n in parts]
    if n_parts != 1:
        raise FolkError(f"cannot split fused layer {module} into {n_parts} parts")
    return [cast(int, module.out_features)]  # a linear's (see LoRARowsLinear.in_features)

"""LoRA, rsLoRA, DoRA and QLoRA layers: a trainable low-rank update beside a frozen linear.

LoRA (Hu et al., 2021, arXiv:2106.09685, eq. 3): ``h = W x + s * B A x`` with ``A``
``(r, in)`` initialised Kaiming-uniform, ``B`` ``(out, r)`` zero, ``s = alpha / r``;
rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732) uses ``s = alpha / sqrt(r)``.
DoRA (Liu et al., 2024, arXiv:2402.09353, eq. 5): ``W' = m * (W + s B A) / ||W + s B A||_c``
with the norm treated as a constant in the backward pass (section 4.3), computed as PEFT
does: ``y = W x + (m / n - 1) * W x + (m / n) * s * B A x``.
QLoRA (Dettmers et al., 2023, arXiv:2305.14314): the same update over a frozen NF4 base
(:class:`folklm.kernels.nf4.NF4Linear`), dequantized on the fly.

Module names follow PEFT's (``base_layer``, ``lora_A``, ``lora_B``,
``lora_magnitude_vector``), so an adapter's tensors map one to one onto PEFT's files
(mlx-lm's ``LoRALinear.from_base`` + ``fuse()`` shape).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from folklm.checkpoint.peft import AdapterConfig, LoraWeights, fused_weight, load_adapter
from folklm.errors import FolkError
from folklm.kernels.base import QuantizedLinear

ALL_LINEAR = "all-linear"


def base_weight(
    layer: nn.Linear | QuantizedLinear, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The dense ``(out, in)`` weight of an ``nn.Linear`` or a quantized linear."""
    if isinstance(layer, QuantizedLinear):
        return layer.dequantize(dtype or torch.float32)
    w = layer.weight
    return w if dtype is None else w.to(dtype)


class LoRALinear(nn.Module):
    """A frozen linear (dense or quantized) plus a LoRA/DoRA update (see the module doc)."""

    def __init__(
        self,
        base_layer: nn.Linear | QuantizedLinear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ):
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise FolkError(f"LoRA rank must be a positive integer, got {r!r}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.use_rslora, self.use_dora = r, float(alpha), use_rslora, use_dora
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        w = base_weight(base_layer)
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Linear(self.in_features, r, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        if use_dora:
            norm = torch.linalg.norm(w.detach().float(), dim=1).to(dtype)  # (out,)
            self.lora_magnitude_vector = nn.Parameter(norm)
        else:
            self.register_parameter("lora_magnitude_vector", None)
        self.disabled = False

    @classmethod
    def from_base(
        cls,
        linear: nn.Module,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> LoRALinear:
        """Wrap ``linear`` (``nn.Linear`` or a ``QuantizedLinear``: QLoRA on NF4)."""
        if not isinstance(linear, nn.Linear | QuantizedLinear):
            raise FolkError(f"cannot put LoRA on a {type(linear).__name__}: need a linear layer")
        return cls(linear, r, alpha, dropout, use_rslora, use_dora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        dtype = self.lora_A.weight.dtype
        h = self.lora_dropout(x)
        lora = self.lora_B(self.lora_A(h.to(dtype)))  # (..., out)
        if self.lora_magnitude_vector is None:
            return y + (self.scaling * lora).to(y.dtype)
        W = base_weight(self.base_layer, y.dtype)
        delta = self.lora_B.weight @ self.lora_A.weight  # (out, in)
        norm = torch.linalg.norm(W + self.scaling * delta.detach().to(W.dtype), dim=1).detach()
        scale = (self.lora_magnitude_vector / norm).to(y.dtype)  # (out,)
        if isinstance(self.lora_dropout, nn.Identity):
            base = y if self.base_layer.bias is None else y - self.base_layer.bias
        else:  # PEFT recomputes W x on the dropped-out input
            base = F.linear(h, W)
        return y + (scale - 1) * base + scale * (self.scaling * lora).to(y.dtype)

    def weights(self) -> LoraWeights:
        m = self.lora_magnitude_vector
        return LoraWeights(
            self.lora_A.weight.detach(),
            self.lora_B.weight.detach(),
            None if m is None else m.detach(),
        )

    def load_weights(self, w: LoraWeights) -> None:
        with torch.no_grad():
            self.lora_A.weight.copy_(w.A)
            self.lora_B.weight.copy_(w.B)
            if (w.magnitude is None) != (self.lora_magnitude_vector is None):
                raise FolkError("adapter and layer disagree on DoRA (lora_magnitude_vector)")
            if w.magnitude is not None:
                self.lora_magnitude_vector.copy_(w.magnitude)

    def fuse(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W'`` (dequantized when the base is quantized)."""
        W = base_weight(self.base_layer).detach()
        dtype = dtype or (W.dtype if W.dtype.is_floating_point else torch.float32)
        fused = fused_weight(W.float(), self.weights(), self.scaling).to(dtype)
        bias = self.base_layer.bias
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, dtype=dtype)
        with torch.no_grad():
            out.weight.copy_(fused)
            if bias is not None:
                out.bias.copy_(bias.detach())
        out.weight.requires_grad_(False)
        return out

    def extra_repr(self) -> str:
        kind = "dora" if self.use_dora else "lora"
        return f"{kind}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}"


# -- applying to a model ----------------------------------------------------------------
def linear_names(model: nn.Module) -> list[str]:
    """Names of the linear layers LoRA may target (the LM head excluded, as PEFT's
    ``all-linear``)."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | QuantizedLinear)
        and not n.endswith("lm_head")
        and ".lora_" not in n
    ]


def resolve_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Full module names matched by ``targets`` (PEFT rule: a name equals the key or ends
    with ``.key``; ``all-linear`` = every linear but the head).

    Raises:
        FolkError: a target matches no module (the valid short names are listed).
    """
    names = linear_names(model)
    if targets == ALL_LINEAR or targets == [ALL_LINEAR]:
        return names
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise FolkError("no target modules given; use names such as q_proj or all-linear")
    chosen: list[str] = []
    valid = sorted({n.rsplit(".", 1)[-1] for n in names})
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            raise FolkError(
                f"target module {t!r} does not exist in this model; valid names: "
                f"{', '.join(valid)} (or {ALL_LINEAR})"
            )
        chosen.extend(h for h in hits if h not in chosen)
    return sorted(chosen, key=names.index)


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, config: AdapterConfig, freeze: bool = True) -> list[str]:
    """Freeze ``model`` and wrap the target linears in :class:`LoRALinear`; returns names."""
    if config.r <= 0:
        raise FolkError(f"LoRA rank must be a positive integer, got r={config.r}")
    names = resolve_targets(model, config.target_modules)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in names:
        layer = model.get_submodule(name)
        _swap(
            model,
            name,
            LoRALinear.from_base(
                layer,
                config.r,
                config.lora_alpha,
                config.lora_dropout,
                config.use_rslora,
                config.use_dora,
            ),
        )
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def adapter_state(model: nn.Module) -> dict[str, LoraWeights]:
    """HF module name -> LoRA weights, ready for :func:`folklm.checkpoint.peft.save_adapter`."""
    return {name: m.weights() for name, m in lora_layers(model)}


def load_adapter_weights(model: nn.Module, layers: dict[str, LoraWeights]) -> None:
    mods = dict(lora_layers(model))
    for name, w in layers.items():
        if name not in mods:
            raise FolkError(f"adapter layer {name!r} is not a LoRA layer of this model")
        mods[name].load_weights(w)


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA update off (the frozen base: DPO's reference) or back on."""
    for _, m in lora_layers(model):
        m.disabled = not enabled


def merge_lora(model: nn.Module) -> list[str]:
    """Replace every :class:`LoRALinear` by its fused ``nn.Linear``; returns the names.

    Raises:
        FolkError: the model holds no LoRA layer (nothing to merge, or merged already).
    """
    found = list(lora_layers(model))
    if not found:
        raise FolkError("nothing to merge: the model has no LoRA layers (already merged?)")
    for name, m in found:
        _swap(model, name, m.fuse())
    return [n for n, _ in found]


def dequantize_linears(model: nn.Module) -> list[str]:
    """Replace every quantized linear (a QLoRA base) by a dense ``nn.Linear``."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name in names:
        q = cast(QuantizedLinear, model.get_submodule(name))  # a name listed just above
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize(torch.float32))
            if q.bias is not None:
                lin.bias.copy_(q.bias)
        _swap(model, name, lin.requires_grad_(False))
    return names


def merge_adapter_into(
    model: nn.Module, layers: dict[str, LoraWeights], config: AdapterConfig
) -> None:
    """Fuse a loaded adapter straight into a plain model's ``nn.Linear`` weights."""
    for name, w in layers.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise FolkError(f"adapter layer {name!r} does not exist in the model") from None
        if not isinstance(lin, nn.Linear):
            raise FolkError(f"adapter layer {name!r} is a {type(lin).__name__}, not a linear")
        with torch.no_grad():
            lin.weight.copy_(fused_weight(lin.weight, w, config.scaling))


def attach_adapter(model: nn.Module, path, merge: bool = False) -> AdapterConfig:
    """Load a PEFT adapter folder onto ``model``: wrap its layers (or fuse when ``merge``)."""
    adapter = load_adapter(path)
    if merge:
        merge_adapter_into(model, adapter.layers, adapter.config)
        return adapter.config
    cfg = adapter.config
    missing = [n for n in adapter.layers if n not in linear_names(model)]
    if missing:
        raise FolkError(f"{path}: adapter layer {missing[0]!r} does not exist in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in adapter.layers:
        layer = model.get_submodule(name)
        dora = adapter.layers[name].magnitude is not None
        _swap(
            model,
            name,
            LoRALinear.from_base(layer, cfg.r, cfg.lora_alpha, 0.0, cfg.use_rslora, dora),
        )
    load_adapter_weights(model, adapter.layers)
    return cfg

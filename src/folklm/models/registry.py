"""``config.json`` ``model_type`` -> model builder, built on the meta device."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from folklm.config import SUPPORTED_MODEL_TYPES, ModelConfig
from folklm.errors import ConfigError
from folklm.models import gemma2, gemma3, llama, mixtral, olmo2, phi3, qwen3, qwen3_moe

BUILDERS: dict[str, Callable[[ModelConfig], llama.CausalLM]] = {
    "llama": llama.build,
    "mistral": llama.build,
    "qwen2": llama.build,
    "mixtral": mixtral.build,
    "qwen3": qwen3.build,
    "qwen3_moe": qwen3_moe.build,
    "gemma2": gemma2.build,
    "gemma3_text": gemma3.build,
    "phi3": phi3.build,
    "olmo2": olmo2.build,
}
assert set(BUILDERS) == set(SUPPORTED_MODEL_TYPES)


def build_model(config: ModelConfig, device: str | torch.device = "meta") -> llama.CausalLM:
    """Instantiate the architecture for ``config``; on ``meta`` no memory is allocated."""
    builder = BUILDERS.get(config.model_type)
    if builder is None:
        raise ConfigError(
            f"unsupported model_type {config.model_type!r}; folklm supports: {', '.join(BUILDERS)}"
        )
    with torch.device(device), _skip_init(str(device) == "meta"):
        model = builder(config)
    return model


@contextmanager
def _skip_init(active: bool):
    """Skip weight initialisation on ``meta``: the weights are assigned right after, and
    ``normal_`` on meta tensors pulls in torch's reference kernels (over a second)."""
    if not active:
        yield
        return
    names = ["normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_"]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)

"""``config.json`` ``model_type`` -> model builder, built on the meta device."""

from __future__ import annotations

from collections.abc import Callable

import torch

from folklm.config import SUPPORTED_MODEL_TYPES, ModelConfig
from folklm.errors import ConfigError
from folklm.models import llama, mixtral

BUILDERS: dict[str, Callable[[ModelConfig], torch.nn.Module]] = {
    "llama": llama.build,
    "mistral": llama.build,
    "qwen2": llama.build,
    "mixtral": mixtral.build,
}
assert set(BUILDERS) == set(SUPPORTED_MODEL_TYPES)


def build_model(config: ModelConfig, device: str | torch.device = "meta") -> llama.CausalLM:
    """Instantiate the architecture for ``config``; on ``meta`` no memory is allocated."""
    builder = BUILDERS.get(config.model_type)
    if builder is None:
        raise ConfigError(
            f"unsupported model_type {config.model_type!r}; folklm supports: {', '.join(BUILDERS)}"
        )
    with torch.device(device):
        model = builder(config)
    return model

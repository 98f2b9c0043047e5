"""folklm: open-weight models from a file on disk to a self-hosted service.

The small public API::

    import folklm
    llm = folklm.load()                      # bundled SmolLM2-135M-Instruct
    llm = folklm.load("path/to/hf-folder")   # or a .gguf file, or a hub name
    print(llm.generate("Once upon a time", max_new_tokens=32).text)
    print(llm.chat([{"role": "user", "content": "Hi!"}]).text)

``load`` resolves a hub name, a path or nothing through the one resolver
(:func:`folklm.hub.resolve.resolve`), then loads the path (:func:`folklm.engine.llm.load`).
Names are imported lazily (PEP 562), so commands that never touch a model (``folk ls``,
``folk verify``) start without importing torch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from folklm.errors import FolkError
from folklm.version import __version__

__all__ = ["LLM", "FolkError", "GenerationOutput", "SamplingParams", "load", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from folklm.engine.llm import LLM, GenerationOutput
    from folklm.ops.sampling import SamplingParams


def load(
    source: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    fast: bool = True,
) -> LLM:
    """Load a model: a hub name (``name[:tag]``), a path, or None for the bundled default.

    Args:
        source: a hub name, a Hugging Face folder, an adapter folder or a ``.gguf`` file.
        dtype, allow_pickle, fast: see :func:`folklm.engine.llm.load`.
    """
    # lazy: `import folklm` must not import torch (the CLI's hub commands start fast)
    from folklm.engine.llm import load as load_path
    from folklm.hub.resolve import resolve_path

    return load_path(resolve_path(source), dtype, allow_pickle, fast, resolve_base=resolve_path)


def __getattr__(name: str) -> Any:
    """Lazy names (PEP 562): the engine and the sampler import torch."""
    if name in ("LLM", "GenerationOutput"):
        from folklm.engine import llm  # lazy: imports torch

        value = getattr(llm, name)
    elif name == "SamplingParams":
        from folklm.ops.sampling import SamplingParams as value  # lazy: imports torch
    else:
        raise AttributeError(f"module 'folklm' has no attribute {name!r}")
    globals()[name] = value
    return value

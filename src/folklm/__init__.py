"""folklm: open-weight models from a file on disk to a self-hosted service.

The small public API::

    import folklm
    llm = folklm.load()                      # bundled SmolLM2-135M-Instruct
    llm = folklm.load("path/to/hf-folder")   # or a .gguf file, or a hub name
    print(llm.generate("Once upon a time", max_new_tokens=32).text)
    print(llm.chat([{"role": "user", "content": "Hi!"}]).text)

Names are imported lazily (PEP 562), so commands that never touch a model (``folk ls``,
``folk verify``) start without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "FolkError", "GenerationOutput", "SamplingParams", "load", "__version__"]

_LAZY = {
    "LLM": "folklm.engine.llm",
    "GenerationOutput": "folklm.engine.llm",
    "load": "folklm.engine.llm",
    "SamplingParams": "folklm.ops.sampling",
    "FolkError": "folklm.errors",
}

if TYPE_CHECKING:  # pragma: no cover
    from folklm.engine.llm import LLM, GenerationOutput, load
    from folklm.errors import FolkError
    from folklm.ops.sampling import SamplingParams


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'folklm' has no attribute {name!r}")

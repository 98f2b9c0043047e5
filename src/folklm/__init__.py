"""folklm: open-weight models from a file on disk to a self-hosted service.

The small public API::

    import folklm
    llm = folklm.load()                      # bundled SmolLM2-135M-Instruct
    llm = folklm.load("path/to/hf-folder")   # or a .gguf file
    print(llm.generate("Once upon a time", max_new_tokens=32).text)
    print(llm.chat([{"role": "user", "content": "Hi!"}]).text)
"""

from folklm.engine.llm import LLM, GenerationOutput, load
from folklm.errors import FolkError
from folklm.ops.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "FolkError", "GenerationOutput", "SamplingParams", "load", "__version__"]

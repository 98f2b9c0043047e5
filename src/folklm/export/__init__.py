"""Export: a hub entry out as a Hugging Face folder or a GGUF file (an operation, layer 4).

* :mod:`~folklm.export.api` -- ``export(name, out, format)``, what ``folk export`` calls;
* :mod:`~folklm.export.ollama` -- a Modelfile + GGUF, or an entry in an Ollama store;
* :mod:`~folklm.export.quantized` -- a folklm-quantized model's tensors as GGUF blocks.

It moved out of ``folklm.hub`` (the store runs no model) and ``folklm.quant``: exporting a
quantized entry loads it through the engine, which only an operation may do.
"""

from folklm.export.api import FORMATS, export, export_report, gguf_metadata

__all__ = ["FORMATS", "export", "export_report", "gguf_metadata"]

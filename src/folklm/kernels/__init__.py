"""Compute kernels below the model code (layer 0): CPU features and quantized linears.

``cpu`` reads what the processor offers; ``int8``/``int4``/``nf4`` are the quantized linear
modules and their packing; ``schemes`` rebuilds them from a saved checkpoint; the GGUF
modules run llama.cpp's block formats on native kernels compiled for this CPU. These
modules are the maths a loaded model runs: they hold no I/O beyond their own build cache
and know no operation. ``folklm.quant`` (layer 4) decides which linears to swap and writes
the result; ``folklm.engine`` (layer 2) rebuilds them from a saved checkpoint.
"""

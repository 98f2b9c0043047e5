"""Quantized linear modules (layer 0): int8, int4 and NF4 weights with their packing.

These modules are the maths a loaded model runs; they hold no I/O and know no operation.
``folklm.quant`` (layer 4) decides which linears to swap and writes the result;
``folklm.engine`` (layer 2) rebuilds them from a saved checkpoint.
"""

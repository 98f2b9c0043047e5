"""Compute kernels below the model code: CPU feature detection and quantized linears."""

"""Numba compute kernels: quantized matmul and the transformer ops."""

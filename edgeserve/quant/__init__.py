"""Quantized weights: the int8 / int4 format, pool units of it, matmuls over them in place."""

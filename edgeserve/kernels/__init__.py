"""CuPy kernels for CUDA, one per file, each behind a typed wrapper with a torch twin."""

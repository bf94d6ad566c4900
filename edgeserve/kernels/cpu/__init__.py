"""C kernels for the CPU (decode matmuls), built on first use, each with torch's result as
its fallback."""

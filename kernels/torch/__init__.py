"""Vectorised PyTorch backends: run wherever torch runs (CPU and CUDA)."""
from kernels.registry import family_backends

BACKENDS = family_backends("kernels.torch", "torch", ("cpu", "cuda"))

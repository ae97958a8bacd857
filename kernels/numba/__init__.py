"""numba backends; declared here, imported on first use."""
from kernels.registry import Backend  # noqa: F401

BACKENDS: list = []

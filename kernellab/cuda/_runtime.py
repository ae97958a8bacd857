"""Loading the .cu sources through NVRTC (cupy.RawModule) and launching them on torch tensors without copies:
kernels get raw device pointers (tensor.data_ptr()) and run on torch's current stream and device."""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import numpy as np
import torch

SOURCE_DIR = Path(__file__).parent
NVRTC_OPTIONS = ("-std=c++17", f"-I{SOURCE_DIR}")


def _cuda_include_dirs() -> tuple[str, ...]:
    """The CUDA toolkit's include folder when there is one (mma.h, cuda_fp16.h for NVRTC)."""
    roots = [os.environ.get(name) for name in ("CUDA_PATH", "CUDA_HOME")] + ["/usr/local/cuda"]
    return tuple(f"-I{root}/include" for root in roots if root and Path(root, "include", "mma.h").exists())


@functools.cache
def module(source: str, names: tuple[str, ...]):
    """The cupy.RawModule of kernellab/cuda/<source>, with the kernel instantiations `names` (C++ name expressions
    such as "moe_unpermute<__half>") looked up by name."""
    import cupy

    code = (SOURCE_DIR / source).read_text()
    return cupy.RawModule(code=code, options=NVRTC_OPTIONS + _cuda_include_dirs(), name_expressions=list(names))


def ptr(t: torch.Tensor | None) -> np.uint64:
    """A kernel argument for a device pointer (null for None). The tensor must be contiguous and stay alive
    until the launch has been queued (the callers hold it)."""
    return np.uint64(0 if t is None else t.data_ptr())


@contextlib.contextmanager
def on_torch_stream(device: torch.device):
    """Launch on torch's current device and stream, so kernels order with the torch ops around them."""
    import cupy

    with cupy.cuda.Device(device.index if device.index is not None else torch.cuda.current_device()):
        with cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
            yield


def ctype(dtype: torch.dtype) -> str:
    """The C++ type of a tensor dtype in the kernel templates."""
    return {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}[dtype]


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b

"""Conversions at the edge of the numba CPU kernels: torch tensors in, NumPy views out, no copies when the
tensor is already contiguous and in the compute dtype. Half-precision inputs are computed in float32."""
import numpy as np
import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (the yardstick), float32 for everything else."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def as_array(x: torch.Tensor | None, dtype: torch.dtype | None = None) -> np.ndarray | None:
    """A contiguous NumPy view of x (a copy only when x is strided or not already `dtype`)."""
    if x is None:
        return None
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x.contiguous().numpy()


def as_bits(x: torch.Tensor) -> np.ndarray:
    """x's elements as unsigned integers of the same width (bfloat16 has no NumPy dtype): for kernels that only
    move rows, so every dtype is copied exactly."""
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return x.contiguous().view(bits).numpy()


def from_bits(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(bits).view(dtype)


def sequence_bounds(B: int, T: int, cu_seqlens: torch.Tensor | None):
    """(batch row, start, end) of every sequence as three int64 arrays [N]: the B rows, or the packed spans."""
    if cu_seqlens is None:
        return (np.arange(B, dtype=np.int64), np.zeros(B, dtype=np.int64), np.full(B, T, dtype=np.int64))
    bounds = cu_seqlens.to(torch.int64).cpu().numpy()
    N = bounds.shape[0] - 1
    return np.zeros(N, dtype=np.int64), bounds[:-1].copy(), bounds[1:].copy()


def device_array(x: torch.Tensor):
    """A numba.cuda view of a contiguous tensor without a copy: through __cuda_array_interface__ on a GPU, the
    NumPy view on CPU tensors (what the simulator, NUMBA_ENABLE_CUDASIM=1, takes)."""
    if x.is_cuda:
        from numba import cuda

        return cuda.as_cuda_array(x)
    return x.numpy()


def float32_contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    """x as a contiguous float32 tensor on its device (the numba.cuda kernels compute in float32: numba has no
    bfloat16 arrays, so half-precision inputs are converted at the edge)."""
    return None if x is None else x.to(torch.float32).contiguous()

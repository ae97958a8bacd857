"""Shared pieces of the CuPy programs: torch <-> array conversion (DLPack, no copies), packed-sequence padding and
the fused elementwise / reduction kernels.

Every program takes the array module `xp` as its first argument and uses only what NumPy and CuPy share, so the
same program runs on CuPy arrays (the backend) and on NumPy arrays (how tests check it without a GPU). Each fused
kernel is a cupy.ElementwiseKernel / ReductionKernel on CuPy arrays and its NumPy expression on NumPy arrays.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch


def as_array(t: torch.Tensor | None, xp, dtype: torch.dtype | None = torch.float32):
    """t as an xp array (float tensors in `dtype`): a DLPack view when t is contiguous and already in `dtype`."""
    if t is None:
        return None
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    t = t.contiguous()
    if xp is np:
        return t.numpy()
    return xp.from_dlpack(t)


def as_tensor(a) -> torch.Tensor:
    """An xp array as a torch tensor (a view)."""
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.from_dlpack(a)


def as_bits(t: torch.Tensor, xp):
    """t's elements as same-width integers (CuPy has no bfloat16): for programs that only move elements."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return as_array(t.contiguous().view(bits), xp, dtype=None)


def padded_positions(xp, B: int, T: int, cu_seqlens: torch.Tensor | None, multiple: int):
    """(index [N, Tp] int64: flat token (in B * T) at each padded position, valid [N, Tp] bool), Tp the longest
    sequence rounded up to `multiple`. Invalid positions point at token 0 and must be masked by the caller."""
    if cu_seqlens is None:
        starts, lengths = np.arange(B) * T, np.full(B, T)
    else:
        bounds = np.asarray(cu_seqlens.tolist(), dtype=np.int64)
        starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
    Tp = -(-max(int(lengths.max()), 1) // multiple) * multiple
    position = np.arange(Tp)
    valid = position[None, :] < lengths[:, None]
    index = np.where(valid, starts[:, None] + position[None, :], 0)
    return xp.asarray(index), xp.asarray(valid)


def pad_sequences(x, index, valid):
    """x [B, T, H, ...] -> [N, H, Tp, ...], zero at padded positions."""
    B, T = x.shape[:2]
    flat = x.reshape(B * T, *x.shape[2:])[index]  # [N, Tp, H, ...]
    flat = flat * valid.reshape(valid.shape + (1,) * (flat.ndim - 2)).astype(flat.dtype)
    return flat.swapaxes(1, 2)


def unpad_sequences(xp, y, index, valid, B: int, T: int):
    """y [N, H, Tp, ...] -> [B, T, H, ...] (the inverse of pad_sequences on the valid positions)."""
    y = y.swapaxes(1, 2)  # [N, Tp, H, ...]
    out = xp.empty((B * T,) + y.shape[2:], dtype=y.dtype)
    out[index[valid]] = y[valid]
    return out.reshape((B, T) + y.shape[2:])


@functools.cache
def _kernels():
    import cupy

    return dict(
        silu_mul=cupy.ElementwiseKernel("T gate, T up", "T out", "out = gate / (T(1) + exp(-gate)) * up",
                                        "lab_silu_mul"),
        decay_rank1=cupy.ElementwiseKernel("T S, T decay, T k, T u", "T out", "out = decay * S + k * u",
                                           "lab_decay_rank1"),
        inv_l2norm=cupy.ReductionKernel("T x", "T y", "x * x", "a + b", "y = T(1) / sqrt(a + T(1e-6))", "0",
                                        "lab_inv_l2norm"),
        exp_minus=cupy.ElementwiseKernel("T x, T shift", "T y", "y = exp(x - shift)", "lab_exp_minus"),
    )


def silu_mul(xp, gate, up):
    """silu(gate) * up, elementwise."""
    if xp is np:
        return gate / (1 + np.exp(-gate)) * up
    return _kernels()["silu_mul"](gate, up)


def decay_rank1(xp, S, decay, k, u):
    """decay * S + k * u with broadcasting: S [..., K, V], decay [..., 1, 1], k [..., K, 1], u [..., 1, V]."""
    if xp is np:
        return decay * S + k * u
    return _kernels()["decay_rank1"](S, decay, k, u)


def l2normalize(xp, x):
    """x / sqrt(sum(x^2) + 1e-6) over the last axis."""
    if xp is np:
        return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)
    return x * _kernels()["inv_l2norm"](x, axis=-1, keepdims=True)


def softmax(xp, x):
    """Softmax over the last axis (max-shifted)."""
    shift = x.max(axis=-1, keepdims=True)
    e = np.exp(x - shift) if xp is np else _kernels()["exp_minus"](x, shift)
    return e / e.sum(axis=-1, keepdims=True)


def array_module(t: torch.Tensor):
    """CuPy for CUDA tensors (the backend), NumPy for CPU tensors (the same program, checked without a GPU)."""
    if t.is_cuda:
        import cupy

        return cupy
    return np


def torch_stream(device: torch.device):
    """Run CuPy work on torch's current device and stream (nothing to enter for CPU tensors)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from kernellab.cuda._runtime import on_torch_stream

    return on_torch_stream(device)

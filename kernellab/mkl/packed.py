"""MKL's packed single-precision GEMM, reached through ctypes in torch's own CPU library, and a cache of packed
expert weights.

MKL's x W^T (what F.linear runs) copies W into its blocked layout on every call, whatever the row count of x.
For an expert GEMM (128 rows x [1024 x 2048], float32, 1 thread) that copy is a fifth of the call:
cblas_sgemm_compute on a weight packed once by cblas_sgemm_pack runs it at 160-170 GFLOP/s, the 1024^3 matmul's
rate, where F.linear reaches 130-145; from 4 to 16 rows it halves the time, at 1 row it ties.
"""
import ctypes
import os
import weakref
from functools import cache

import numba
import numpy as np
import torch

from kernellab.validate import trusted_inputs

_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162
_int, _ptr = ctypes.c_int, ctypes.c_void_p


@cache
def _library():
    """torch's CPU library with MKL's packed-GEMM entry points, sgemm, strsm and MKL_Set_Num_Threads_Local typed, or
    None without MKL."""
    if not torch.backends.mkl.is_available():
        return None
    library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    if not all(hasattr(library, name) for name in ("cblas_sgemm_pack_get_size", "cblas_sgemm_pack",
                                                   "cblas_sgemm_compute", "sgemm_", "strsm_",
                                                   "MKL_Set_Num_Threads_Local")):
        return None
    library.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
    library.cblas_sgemm_pack_get_size.argtypes = [_int] * 4
    library.cblas_sgemm_pack.restype = None
    library.cblas_sgemm_pack.argtypes = [_int] * 6 + [ctypes.c_float, _ptr, _int, _ptr]
    library.cblas_sgemm_compute.restype = None
    library.cblas_sgemm_compute.argtypes = [_int] * 6 + [_ptr, _int, _ptr, _int, ctypes.c_float, _ptr, _int]
    # the Fortran sgemm and strsm, every argument by pointer: callable from numba code
    library.sgemm_.restype = library.strsm_.restype = None
    library.sgemm_.argtypes = [_ptr] * 13
    library.strsm_.argtypes = [_ptr] * 11
    # the calling thread's MKL thread count (0: the global one), returning the previous: numba's worker threads
    # are not the ones torch.set_num_threads sets (the C entry: mkl_set_num_threads_local is the Fortran one)
    library.MKL_Set_Num_Threads_Local.restype = _int
    library.MKL_Set_Num_Threads_Local.argtypes = [_int]
    return library


def unavailable_reason():
    if _library() is None:
        return ("needs torch built with MKL (cblas_sgemm_pack / cblas_sgemm_compute / sgemm_ / strsm_ / "
                "MKL_Set_Num_Threads_Local in libtorch_cpu), absent here")
    return None


def packable(x, w):
    """Whether x @ w[e]^T runs on packed weights: float32 CPU tensors with something to multiply, w not an
    inference tensor (made under torch.inference_mode: it has no version counter, so an in-place write to it
    could not be seen)."""
    return (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and w.numel() > 0
            and not w.is_inference() and _library() is not None)


@numba.njit
def _fingerprint(words):
    """A 64-bit fingerprint of the uint32 words [n]: the sum of a bijective mix of each word with its position
    (so any one changed word changes it, and a moved one almost surely). One pass in vectorised 32-bit
    arithmetic, at about the speed of reading the words."""
    total = np.uint64(0)
    for i in range(words.shape[0]):
        m = (words[i] ^ (np.uint32(i) * np.uint32(0x9E3779B9))) * np.uint32(0x85EBCA6B)
        total += np.uint64(m ^ (m >> np.uint32(16)))
    return total


def fingerprint(we: torch.Tensor) -> int:
    """The content fingerprint of one expert's weight we [Nout, K] float32 (its bits, not its values)."""
    return int(_fingerprint(we.contiguous().view(torch.int32).reshape(-1).numpy().view(np.uint32)))


class PackedExperts:
    """MKL-packed copies of w[e] for w [E, Nout, K] (float32, CPU), each packed on its first use (a subclass packs
    for another GEMM by its own _pack, with the same staleness guard).

    MKL sizes a packed [Nout, K] weight at 2.48x its bytes; only about its own size is written, so on Linux the
    rest is never backed by memory.

    A pack is reused only while its expert's bits are those it was packed from: each use compares the expert's
    content fingerprint with the pack's (a write through .data, .numpy() or DLPack bumps no version counter),
    and repacks on a difference. Under KERNELLAB_TRUST_INPUTS=1 the fingerprint is skipped (the caller then
    promises no such write)."""

    def __init__(self, w):
        self.weight = weakref.ref(w)
        self.key = (w.data_ptr(), w._version, tuple(w.shape), w.stride())
        self.packed = [None] * w.shape[0]
        self.fingerprints = [None] * w.shape[0]

    def fresh_for(self, w):
        return self.weight() is w and self.key == (w.data_ptr(), w._version, tuple(w.shape), w.stride())

    def linear(self, x, e, out=None):
        """x [n, K] (any row stride) @ w[e]^T -> [n, Nout] float32, into `out` (contiguous rows) when given."""
        Nout, K = self.weight().shape[1:]
        packed = self.packed_weight(e)
        if x.stride(-1) != 1:
            x = x.contiguous()
        out = torch.empty(x.shape[0], Nout, dtype=x.dtype) if out is None else out
        if x.shape[0]:
            _library().cblas_sgemm_compute(_ROW_MAJOR, _NO_TRANS, _PACKED, x.shape[0], Nout, K, x.data_ptr(),
                                           x.stride(0), packed.data_ptr(), K, 0.0, out.data_ptr(),
                                           out.stride(0))
        return out

    def packed_weight(self, e):
        """w[e] packed (a uint8 tensor), packed now if this is its first use or w[e]'s bits changed since."""
        w = self.weight()
        we = w[e] if w.stride(-1) == 1 else w[e].contiguous()
        check = not trusted_inputs()
        if self.packed[e] is None or (check and self.fingerprints[e] != fingerprint(we)):
            self.fingerprints[e] = fingerprint(we) if check else None
            self.packed[e] = self._pack(we)
        return self.packed[e]

    def addresses(self, experts):
        """int64 [E]: the addresses of the packed weights of `experts` (packed now where needed), 0 elsewhere."""
        addresses = np.zeros(len(self.packed), dtype=np.int64)
        for e in experts:
            addresses[e] = self.packed_weight(e).data_ptr()
        return addresses

    @staticmethod
    def _pack(we):
        library = _library()
        Nout, K = we.shape
        size = library.cblas_sgemm_pack_get_size(_B_MATRIX, 1, Nout, K)
        packed = torch.empty(size, dtype=torch.uint8)
        library.cblas_sgemm_pack(_ROW_MAJOR, _B_MATRIX, _TRANS, 1, Nout, K, 1.0, we.data_ptr(), we.stride(0),
                                 packed.data_ptr())
        return packed


# (kind, id(weight tensor)) -> its packs of that kind (PackedExperts or a subclass packing for another GEMM); an
# entry leaves with its tensor, and is replaced when the tensor's version counter shows an in-place write (or its
# storage or shape changed).
_CACHE: dict[tuple[type, int], PackedExperts] = {}


def packed_experts(w, kind=PackedExperts):
    """The cached `kind` (PackedExperts: MKL's packs) of w [E, Nout, K] float32 CPU, made (empty) on first sight."""
    key = (kind, id(w))
    entry = _CACHE.get(key)
    if entry is None or not entry.fresh_for(w):
        if entry is None:
            weakref.finalize(w, _CACHE.pop, key, None)
        entry = _CACHE[key] = kind(w)
    return entry

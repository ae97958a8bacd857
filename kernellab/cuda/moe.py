"""Launchers of kernellab/cuda/moe.cu: stable permutation, weighted unpermutation, the tensor-core grouped GEMM,
and the expert layer built from them (silu(gate) * up in torch between the two GEMMs)."""
import numpy as np
import torch
import torch.nn.functional as F

from kernellab.cuda._runtime import cdiv, ctype, module, on_torch_stream, ptr
from kernellab.types import Permutation

SOURCE = "moe.cu"
PERMUTE_TILE = 256
GEMM_BM, GEMM_BN, GEMM_THREADS = 64, 64, 128
_VECTORS = {16: "uint4", 8: "uint2", 4: "unsigned int", 2: "unsigned short"}
_DTYPES = ("float", "__half", "__nv_bfloat16")
NAMES = (("moe_tile_counts<int>", "moe_tile_counts<long long>", "moe_place<int>", "moe_place<long long>",
          "moe_scan_counts", "moe_invert_source", "moe_tile_schedule")
         + tuple(f"moe_gather_rows<{v}>" for v in _VECTORS.values())
         + tuple(f"{kernel}<{t}>" for kernel in ("moe_unpermute", "moe_grouped_gemm") for t in _DTYPES))


def _kernel(name):
    return module(SOURCE, NAMES).get_function(name)


def _id_type(ids):
    return "int" if ids.dtype == torch.int32 else "long long"


def moe_permute(x, ids, num_experts):
    """x [N, D]; ids [N, top_k] int32/int64 in [-1, E). Returns a Permutation: x [M, D] (rows copied as raw
    16/8/4/2-byte vectors), offsets int32 [E + 1], source int64 [M]. Reads M back to size the output."""
    N, top_k = ids.shape
    slots = N * top_k
    tiles = cdiv(slots, PERMUTE_TILE)
    ids = ids.contiguous()
    device = x.device
    counts = torch.zeros(tiles, num_experts, dtype=torch.int32, device=device)
    tile_base = torch.empty_like(counts)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    with on_torch_stream(device):
        _kernel(f"moe_tile_counts<{_id_type(ids)}>")((tiles,), (PERMUTE_TILE,),
                                                      (ptr(ids), np.int64(slots), np.int32(num_experts), ptr(counts)))
        _kernel("moe_scan_counts")((1,), (256,), (ptr(counts), np.int32(tiles), np.int32(num_experts),
                                                  ptr(tile_base), ptr(offsets)))
        M = int(offsets[-1])
        source = torch.empty(M, dtype=torch.int64, device=device)
        rows = torch.empty(M, x.shape[1], dtype=x.dtype, device=device)
        if M:
            _kernel(f"moe_place<{_id_type(ids)}>")((tiles,), (PERMUTE_TILE,), (
                ptr(ids), np.int64(slots), np.int32(num_experts), ptr(tile_base), ptr(offsets), ptr(source)))
            x = x.contiguous()
            row_bytes = x.shape[1] * x.element_size()
            vec = next(v for v in _VECTORS if row_bytes % v == 0 and x.data_ptr() % v == 0)
            _kernel(f"moe_gather_rows<{_VECTORS[vec]}>")((M,), (128,), (
                ptr(x), ptr(source), np.int32(top_k), np.int32(row_bytes // vec), ptr(rows)))
    return Permutation(rows, offsets, source, N, top_k)


def moe_unpermute(y_sorted, p, weights):
    """y_sorted [M, D']; weights [N, top_k]. Returns [N, D'] in y_sorted's dtype (float32 sums)."""
    device = y_sorted.device
    M, D = y_sorted.shape
    y_sorted = y_sorted.contiguous()
    weights = weights.to(torch.float32).contiguous()
    source = p.source.to(torch.int64).contiguous()
    row_of_slot = torch.full((p.num_tokens * p.top_k,), -1, dtype=torch.int64, device=device)
    out = torch.empty(p.num_tokens, D, dtype=y_sorted.dtype, device=device)
    with on_torch_stream(device):
        if M:
            _kernel("moe_invert_source")((cdiv(M, 256),), (256,), (ptr(source), np.int64(M), ptr(row_of_slot)))
        _kernel(f"moe_unpermute<{ctype(y_sorted.dtype)}>")((p.num_tokens,), (min(256, cdiv(D, 32) * 32),), (
            ptr(y_sorted), ptr(row_of_slot), ptr(weights), np.int32(p.top_k), np.int32(D), ptr(out)))
    return out


def grouped_gemm(x, w, offsets):
    """x [M, K] grouped by expert; w [E, N, K]; offsets int32 [E + 1]. Returns y [M, N] in x's dtype: one launch
    over a device-built tile schedule (no read back), WMMA tensor cores (tf32 for float32), fp32 accumulation."""
    M, K = x.shape
    E, N, _ = w.shape
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    x, w = x.contiguous(), w.contiguous()
    offsets = offsets.to(torch.int32).contiguous()
    max_tiles = cdiv(M, GEMM_BM) + E  # every group wastes at most one partial tile
    schedule = torch.empty(2 * max_tiles + 1, dtype=torch.int32, device=x.device)
    tile_expert, tile_row, num_tiles = schedule[:max_tiles], schedule[max_tiles:-1], schedule[-1:]
    with on_torch_stream(x.device):
        _kernel("moe_tile_schedule")((1,), (1,), (ptr(offsets), np.int32(E), ptr(tile_expert), ptr(tile_row),
                                                  ptr(num_tiles)))
        vector_loads = (K * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
        _kernel(f"moe_grouped_gemm<{ctype(x.dtype)}>")((max_tiles, cdiv(N, GEMM_BN)), (GEMM_THREADS,), (
            ptr(x), ptr(w), ptr(offsets), ptr(tile_expert), ptr(tile_row), ptr(num_tiles), np.int32(K),
            np.int32(N), np.int32(vector_loads), ptr(y)))
    return y


def moe(x, weights, ids, w_gate_up, w_down):
    """x [N, D]; weights, ids [N, top_k]; w_gate_up [E, 2I, D]; w_down [E, D, I]. Returns [N, D] in x's dtype:
    permute -> grouped GEMM (gate, up) -> silu(gate) * up -> grouped GEMM (down) -> weighted unpermute."""
    I = w_down.shape[2]
    p = moe_permute(x, ids, w_gate_up.shape[0])
    gate_up = grouped_gemm(p.x, w_gate_up, p.offsets)
    act = F.silu(gate_up[:, :I].float()) * gate_up[:, I:].float()
    return moe_unpermute(grouped_gemm(act.to(x.dtype), w_down, p.offsets), p, weights)

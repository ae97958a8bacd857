"""Triton kernels of the MoE family: routing, token permutation, grouped expert GEMM and the fused expert layer.

Pipeline of the fused layer (`moe`), all on device, no host synchronisation:

    ids [N, top_k] --count--> chunk_counts [C, E] --scan--> offsets [E + 1], chunk_prefix [C, E]
        --scatter (stable)--> row_map [B * BLOCK_M]: the slot n * top_k + j at each position, expert e's rows
                              padded to a multiple of BLOCK_M (the "block-aligned" layout), -1 at padding
        --align--> block_expert [B] (one expert per block of BLOCK_M positions), num_blocks [1]
    h = silu(x[slot // top_k] W_g^T) * (x[slot // top_k] W_u^T)      gate/up GEMM: gather fused into the A
                                                                       loads, SwiGLU in the epilogue
    y_slots[slot] = weights[slot] * h W_down^T                        down GEMM: weight in the epilogue
    y[n] = sum_j y_slots[n * top_k + j]  (float32, fixed order)       deterministic combine, no atomics

`moe_permute` uses the same count / scan / scatter kernels without the padding, `grouped_gemm` builds the
block table from its offsets, and all GEMMs run one persistent kernel that walks the (block, N-tile) pairs
of every group, so empty experts cost nothing and a 1-row expert costs one BLOCK_M tile.

Decode (N <= 64 tokens) uses BLOCK_M = 16, so 8 real rows are padded to 16, not to the prefill tile, and one
program does the count, scan, block table and scatter (four launches become one).
Row indices and program ids are cast to int64 before they multiply a stride (tensors past 2^31 elements).
On a GPU the GEMM tiles are autotuned (key: N, K, BLOCK_M and the variant, never the token count); under
TRITON_INTERPRET=1 one small config is used directly.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.triton import AotSpec
from kernels.types import Permutation

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DECODE_MAX_TOKENS = 64
DECODE_BLOCK_M = 16
# Slots handled by one program of the count and scatter kernels (a multiple of SLOT_BLOCK). Small under the
# interpreter so that the tests cross chunk boundaries at small N.
GPU_SLOT_BLOCK = 32
SLOT_BLOCK = 16 if INTERPRET else GPU_SLOT_BLOCK
SLOTS_PER_CHUNK = 4 * SLOT_BLOCK if INTERPRET else 1024


def _slot_block(block_e, largest=SLOT_BLOCK):
    """Slots per step of the count and scatter kernels: their [slots, experts] one-hot tile stays <= 8192."""
    return min(largest, max(8, 8192 // block_e))


# ----------------------------------------------------------------------------------------------------------------
# Routing


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, N, E, stride_ln, stride_le,
                  TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """logits [N, E] -> weights float32 [N, TOP_K], ids int32 [N, TOP_K]; one program per BLOCK_N tokens."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < N
    col_ok = cols < E
    logits = tl.load(logits_ptr + rows[:, None] * stride_ln + cols[None, :] * stride_le,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = probs / tl.sum(probs, axis=1)[:, None]
    # Columns past E never win (-1 < any probability); a chosen column is set to -2 for the next rounds.
    probs = tl.where(col_ok[None, :], probs, -1.0)
    ks = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(probs, axis=1)
        best_col = tl.min(tl.where(probs == best[:, None], cols[None, :], BLOCK_E), axis=1)  # lowest index on ties
        top_w = tl.where(ks[None, :] == j, best[:, None], top_w)
        top_i = tl.where(ks[None, :] == j, best_col[:, None], top_i)
        probs = tl.where(cols[None, :] == best_col[:, None], -2.0, probs)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    out = rows[:, None] * TOP_K + ks[None, :]
    mask = row_ok[:, None] & (ks < TOP_K)[None, :]
    tl.store(weights_ptr + out, top_w, mask=mask)
    tl.store(ids_ptr + out, top_i, mask=mask)


def route(router_logits, top_k, renormalize=True):
    """router_logits [N, E] -> softmax (float32) -> top_k -> renormalise, fused in one kernel.
    Returns weights float32 [N, top_k] and ids int32 [N, top_k]."""
    N, E = router_logits.shape
    weights = torch.empty(N, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(N, top_k, dtype=torch.int32, device=router_logits.device)
    if N == 0:
        return weights, ids
    block_e = triton.next_power_of_2(E)
    block_n = max(1, min(16, 4096 // block_e))
    _route_kernel[(triton.cdiv(N, block_n),)](
        router_logits, weights, ids, N, E, router_logits.stride(0), router_logits.stride(1),
        TOP_K=top_k, RENORMALIZE=renormalize, BLOCK_N=block_n, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k), num_warps=4 if block_e <= 256 else 8)
    return weights, ids


# ----------------------------------------------------------------------------------------------------------------
# Counting, prefix sums and the stable scatter


@triton.jit
def _count_slots(ids_ptr, first, last, num_slots, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """Rows per expert among the slots first..last of ids (flat [num_slots]): int32 [BLOCK_E]."""
    experts = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(first, last, BLOCK_S):
        slots = start + tl.arange(0, BLOCK_S)
        expert = tl.load(ids_ptr + slots, mask=slots < num_slots, other=-1).to(tl.int32)
        counts += tl.sum((expert[:, None] == experts[None, :]).to(tl.int32), axis=0)
    return counts


@triton.jit
def _scatter_slots(ids_ptr, dest_ptr, base, first, last, num_slots, dest_size,
                   BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """dest[base[e] + rank] = s for the slots s of first..last with ids[s] = e >= 0, rank counting the earlier
    slots of e in that range (stable). base: int32 [BLOCK_E]. Positions >= dest_size are dropped."""
    experts = tl.arange(0, BLOCK_E)
    for start in range(first, last, BLOCK_S):
        slots = start + tl.arange(0, BLOCK_S)
        expert = tl.load(ids_ptr + slots, mask=slots < num_slots, other=-1).to(tl.int32)
        onehot = (expert[:, None] == experts[None, :]).to(tl.int32)
        position = tl.sum((base[None, :] + tl.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)
        tl.store(dest_ptr + position, slots, mask=(expert >= 0) & (position < dest_size))
        base += tl.sum(onehot, axis=0)


@triton.jit
def _padded(counts, BLOCK_M: tl.constexpr):
    """Rows per expert rounded up to a multiple of BLOCK_M."""
    return (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M


@triton.jit
def _write_block_table(blocks, starts, counts, E, row_map_ptr, block_expert_ptr, max_blocks,
                       CONTIGUOUS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """For the blocks `blocks` [BLOCK_B] of the block-aligned layout of experts with rows starts[e] +
    [0, counts[e]) ([BLOCK_E] each): block_expert (-1 past the used blocks) and, at the used blocks, row_map: -1
    at padding positions and, when CONTIGUOUS, starts[e] + i at the i-th position of expert e."""
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < E
    padded = _padded(counts, BLOCK_M)
    padded_ends = tl.cumsum(padded, axis=0)
    first = blocks * BLOCK_M
    # A block belongs to the first expert whose padded rows end after the block's first position.
    block_expert = tl.sum(((padded_ends[None, :] <= first[:, None]) & expert_ok[None, :]).to(tl.int32), axis=1)
    used = blocks < tl.sum(padded, axis=0) // BLOCK_M
    tl.store(block_expert_ptr + blocks, tl.where(used, block_expert, -1), mask=blocks < max_blocks)
    mine = experts[None, :] == block_expert[:, None]
    local = first - tl.sum(tl.where(mine, padded_ends - padded, 0), axis=1)  # position of the block in its expert
    count = tl.sum(tl.where(mine, counts, 0), axis=1)
    start = tl.sum(tl.where(mine, starts, 0), axis=1)
    i = local[:, None] + tl.arange(0, BLOCK_M)[None, :]
    real = i < count[:, None]
    ptrs = row_map_ptr + first.to(tl.int64)[:, None] + tl.arange(0, BLOCK_M)[None, :]
    if CONTIGUOUS:
        tl.store(ptrs, tl.where(real, start[:, None] + i, -1), mask=used[:, None])
    else:
        tl.store(ptrs, tl.full([blocks.shape[0], BLOCK_M], -1, tl.int32), mask=used[:, None] & ~real)


@triton.jit
def _count_kernel(ids_ptr, chunk_counts_ptr, num_slots, E, slots_per_chunk,
                  BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """chunk_counts[c, e] = number of slots of chunk c routed to expert e. ids: flat [num_slots]."""
    chunk = tl.program_id(0).to(tl.int64)
    first = chunk * slots_per_chunk
    counts = _count_slots(ids_ptr, first, tl.minimum(first + slots_per_chunk, num_slots), num_slots,
                          BLOCK_S, BLOCK_E)
    experts = tl.arange(0, BLOCK_E)
    tl.store(chunk_counts_ptr + chunk * E + experts, counts, mask=experts < E)


@triton.jit
def _scan_kernel(chunk_counts_ptr, offsets_ptr, num_chunks, E, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    """One program. chunk_counts [C, E] becomes, in place, the exclusive prefix over chunks of each expert;
    offsets [E + 1] = 0, then the running total of rows per expert."""
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < E
    total = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_chunks, BLOCK_C):
        chunks = start + tl.arange(0, BLOCK_C)
        ptrs = chunk_counts_ptr + chunks[:, None] * E + experts[None, :]
        mask = (chunks < num_chunks)[:, None] & expert_ok[None, :]
        counts = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, total[None, :] + tl.cumsum(counts, axis=0) - counts, mask=mask)
        total += tl.sum(counts, axis=0)
    ends = tl.cumsum(total, axis=0)
    tl.store(offsets_ptr + 1 + experts, ends, mask=expert_ok)
    tl.store(offsets_ptr + experts, ends - total, mask=experts == 0)


@triton.jit
def _scatter_kernel(ids_ptr, chunk_prefix_ptr, offsets_ptr, dest_ptr, num_slots, E, slots_per_chunk, dest_size,
                    ALIGN_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """dest[position of slot s] = s for every slot with ids[s] >= 0: experts ascending, slots ascending within
    an expert (stable). Positions start at offsets[e] (ALIGN_M = 0) or at the starts of the layout padded to
    multiples of ALIGN_M. Positions >= dest_size are dropped (a caller's row bound too small)."""
    chunk = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < E
    starts = tl.load(offsets_ptr + experts, mask=expert_ok, other=0).to(tl.int32)
    if ALIGN_M > 0:
        padded = _padded(tl.load(offsets_ptr + 1 + experts, mask=expert_ok, other=0).to(tl.int32) - starts, ALIGN_M)
        starts = tl.cumsum(padded, axis=0) - padded
    base = starts + tl.load(chunk_prefix_ptr + chunk * E + experts, mask=expert_ok, other=0)
    first = chunk * slots_per_chunk
    _scatter_slots(ids_ptr, dest_ptr, base, first, tl.minimum(first + slots_per_chunk, num_slots), num_slots,
                   dest_size, BLOCK_S, BLOCK_E)


@triton.jit
def _align_kernel(offsets_ptr, row_map_ptr, block_expert_ptr, num_blocks_ptr, E, max_blocks,
                  CONTIGUOUS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    """The block table of the block-aligned layout, for BLOCK_B blocks per program (see _write_block_table).
    offsets [E + 1]: rows of each expert. Program 0 writes num_blocks [1]. Without CONTIGUOUS the scatter
    kernel writes the real positions of row_map."""
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < E
    starts = tl.load(offsets_ptr + experts, mask=expert_ok, other=0).to(tl.int32)
    counts = tl.load(offsets_ptr + 1 + experts, mask=expert_ok, other=0).to(tl.int32) - starts
    if tl.program_id(0) == 0:
        tl.store(num_blocks_ptr, tl.sum(_padded(counts, BLOCK_M), axis=0) // BLOCK_M)
    blocks = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    _write_block_table(blocks, starts, counts, E, row_map_ptr, block_expert_ptr, max_blocks, CONTIGUOUS,
                       BLOCK_M, BLOCK_E)


@triton.jit
def _align_one_program_kernel(ids_ptr, offsets_ptr, row_map_ptr, block_expert_ptr, num_blocks_ptr, num_slots, E,
                              max_blocks, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr,
                              BLOCK_E: tl.constexpr):
    """Decode: count, prefix sum, block table and stable scatter of align_slots in one program (one launch in
    place of four; at most a few hundred slots). ids flat [num_slots]; writes offsets [E + 1], num_blocks [1],
    block_expert [max_blocks] and row_map."""
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < E
    counts = _count_slots(ids_ptr, 0, num_slots, num_slots, BLOCK_S, BLOCK_E)
    ends = tl.cumsum(counts, axis=0)
    tl.store(offsets_ptr + 1 + experts, ends, mask=expert_ok)
    tl.store(offsets_ptr + experts, ends - counts, mask=experts == 0)
    padded = _padded(counts, BLOCK_M)
    tl.store(num_blocks_ptr, tl.sum(padded, axis=0) // BLOCK_M)
    for first_block in range(0, max_blocks, BLOCK_B):
        _write_block_table(first_block + tl.arange(0, BLOCK_B), ends - counts, counts, E, row_map_ptr,
                           block_expert_ptr, max_blocks, False, BLOCK_M, BLOCK_E)
    _scatter_slots(ids_ptr, row_map_ptr, tl.cumsum(padded, axis=0) - padded, 0, num_slots, num_slots,
                   max_blocks * BLOCK_M, BLOCK_S, BLOCK_E)


def _chunk_counts(ids_flat, num_experts):
    """Launches count + scan. Returns offsets int32 [E + 1] and chunk_prefix int32 [C, E]. With no slots there
    are no chunks, and the one-program scan still writes offsets = 0."""
    num_slots = ids_flat.numel()
    num_chunks = triton.cdiv(num_slots, SLOTS_PER_CHUNK)
    block_e = triton.next_power_of_2(num_experts)
    chunk_counts = torch.empty(num_chunks, num_experts, dtype=torch.int32, device=ids_flat.device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=ids_flat.device)
    _count_kernel[(num_chunks,)](ids_flat, chunk_counts, num_slots, num_experts, SLOTS_PER_CHUNK,
                                 BLOCK_S=_slot_block(block_e), BLOCK_E=block_e)
    _scan_kernel[(1,)](chunk_counts, offsets, num_chunks, num_experts,
                       BLOCK_C=max(1, min(64, 8192 // block_e)), BLOCK_E=block_e)
    return offsets, chunk_counts


def _scatter(ids_flat, offsets, chunk_prefix, dest, align_m):
    """Launches the scatter kernel: dest[position of slot s] = s (unpadded, or padded to align_m)."""
    num_slots, num_experts = ids_flat.numel(), offsets.numel() - 1
    block_e = triton.next_power_of_2(num_experts)
    _scatter_kernel[(chunk_prefix.shape[0],)](ids_flat, chunk_prefix, offsets, dest, num_slots, num_experts,
                                              SLOTS_PER_CHUNK, dest.numel(), ALIGN_M=align_m,
                                              BLOCK_S=_slot_block(block_e), BLOCK_E=block_e)


def max_aligned_blocks(num_rows, num_experts, block_m):
    """Upper bound on the blocks of the block-aligned layout of num_rows rows over num_experts experts:
    each non-empty expert adds at most one partly filled block."""
    return triton.cdiv(num_rows, block_m) + min(num_experts, num_rows)


def _block_b(block_m):
    """Blocks per step of the block-table kernels: their [blocks, BLOCK_M] row tile stays <= 1024 entries."""
    return max(8, 1024 // block_m)


def _block_table(offsets, row_map, max_blocks, block_m, contiguous):
    """Launches the align kernel; returns (block_expert int32 [max_blocks], num_blocks int32 [1])."""
    num_experts = offsets.numel() - 1
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=offsets.device)
    num_blocks = torch.empty(1, dtype=torch.int32, device=offsets.device)
    block_b = _block_b(block_m)
    _align_kernel[(max(1, triton.cdiv(max_blocks, block_b)),)](  # program 0 always writes num_blocks
        offsets, row_map, block_expert, num_blocks, num_experts, max_blocks, CONTIGUOUS=contiguous,
        BLOCK_M=block_m, BLOCK_B=block_b, BLOCK_E=triton.next_power_of_2(num_experts))
    return block_expert, num_blocks


def align_slots(ids, num_experts, block_m, one_program=False):
    """The block-aligned layout of the slots of ids [N, top_k] (int32 or int64, -1 = no expert).

    Returns (row_map, block_expert, num_blocks, offsets):
      row_map      int32 [max_blocks * block_m]: expert e's slots n * top_k + j, ascending, from position
                   padded_start[e] (a multiple of block_m), then -1 up to the next multiple of block_m;
                   positions past num_blocks * block_m are not written;
      block_expert int32 [max_blocks]: the expert of each block of block_m positions, -1 past num_blocks;
      num_blocks   int32 [1] (on device: no synchronisation);
      offsets      int32 [E + 1] of the unpadded layout.
    max_blocks = max_aligned_blocks(N * top_k, E, block_m). one_program: a single launch (decode batches)
    instead of count, scan, block table and scatter spread over the slots."""
    ids_flat = ids.reshape(-1)
    max_blocks = max_aligned_blocks(ids_flat.numel(), num_experts, block_m)
    row_map = torch.empty(max_blocks * block_m, dtype=torch.int32, device=ids.device)
    if not one_program:
        offsets, chunk_prefix = _chunk_counts(ids_flat, num_experts)
        block_expert, num_blocks = _block_table(offsets, row_map, max_blocks, block_m, contiguous=False)
        _scatter(ids_flat, offsets, chunk_prefix, row_map, block_m)
        return row_map, block_expert, num_blocks, offsets
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=ids.device)
    num_blocks = torch.empty(1, dtype=torch.int32, device=ids.device)
    block_e = triton.next_power_of_2(num_experts)
    _align_one_program_kernel[(1,)](ids_flat, offsets, row_map, block_expert, num_blocks, ids_flat.numel(),
                                    num_experts, max_blocks, BLOCK_M=block_m, BLOCK_S=_slot_block(block_e),
                                    BLOCK_B=_block_b(block_m), BLOCK_E=block_e)
    return row_map, block_expert, num_blocks, offsets


# ----------------------------------------------------------------------------------------------------------------
# Gathers and the deterministic combine


@triton.jit
def _gather_rows_kernel(x_ptr, source_ptr, out_ptr, num_rows, D, top_k,
                        stride_xn, stride_xd, stride_om, stride_od, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = x[source[r] // top_k] (zeros where source[r] < 0). out [num_rows, D]."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    col_ok = cols < D
    slot = tl.load(source_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    token = slot // top_k
    values = tl.load(x_ptr + token[:, None] * stride_xn + cols[None, :] * stride_xd,
                     mask=(slot >= 0)[:, None] & col_ok[None, :], other=0.0)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_od, values,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _invert_kernel(source_ptr, row_of_slot_ptr, num_rows, BLOCK: tl.constexpr):
    """row_of_slot[source[r]] = r for every row r with source[r] >= 0."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(source_ptr + rows, mask=rows < num_rows, other=-1).to(tl.int64)
    tl.store(row_of_slot_ptr + slot, rows, mask=slot >= 0)


@triton.jit
def _combine_kernel(y_ptr, slot_map_ptr, weights_ptr, out_ptr, N, D, top_k,
                    stride_ym, stride_yd, stride_on, stride_od,
                    ROWS_ARE_SLOTS: tl.constexpr, WEIGHTED: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n] = sum over j = 0..top_k-1 of (weights[n, j] *) y[row of slot n * top_k + j], in float32, in that
    order (deterministic). Slot s is present when slot_map[s] >= 0; its row is s itself (ROWS_ARE_SLOTS: y is
    in slot order and slot_map holds the expert ids) or slot_map[s]. out [N, D]."""
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < N
    col_ok = cols < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in range(top_k):
        slots = tokens * top_k + j
        mapped = tl.load(slot_map_ptr + slots, mask=token_ok, other=-1).to(tl.int64)
        present = mapped >= 0
        if ROWS_ARE_SLOTS:
            rows = slots
        else:
            rows = mapped
        y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yd,
                    mask=present[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if WEIGHTED:
            y *= tl.load(weights_ptr + slots, mask=present, other=0.0).to(tl.float32)[:, None]
        acc += y
    tl.store(out_ptr + tokens[:, None] * stride_on + cols[None, :] * stride_od, acc.to(out_ptr.dtype.element_ty),
             mask=token_ok[:, None] & col_ok[None, :])


def _combine(y, slot_map, weights, num_tokens, top_k, rows_are_slots):
    """Launches the combine kernel: [num_tokens, D] in y's dtype. slot_map, weights: flat [num_tokens * top_k]."""
    D = y.shape[1]
    out = torch.empty(num_tokens, D, dtype=y.dtype, device=y.device)
    if num_tokens == 0 or D == 0:
        return out
    block_d = min(triton.next_power_of_2(D), 256 if INTERPRET else 1024)
    block_t = 16 if INTERPRET else 1
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(D, block_d))
    _combine_kernel[grid](y, slot_map, slot_map if weights is None else weights, out, num_tokens, D, top_k,
                          y.stride(0), y.stride(1), out.stride(0), out.stride(1),
                          ROWS_ARE_SLOTS=rows_are_slots, WEIGHTED=weights is not None,
                          BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return out


def moe_permute(x, ids, num_experts, max_rows=None):
    """Group the rows of x [N, D] by expert for ids [N, top_k] (int32/int64, -1 = no expert).

    Without max_rows: one host synchronisation (to read M, the number of ids >= 0); returns
    Permutation(x [M, D], offsets int32 [E + 1], source int64 [M], N, top_k), exactly API.md's order.
    With max_rows (an upper bound on M, e.g. N * top_k): no host synchronisation; x is [max_rows, D] and source
    [max_rows]; rows offsets[E]:max_rows (M is offsets[E], on device) have source -1 and x zero, so
    moe_unpermute ignores them. Rows past max_rows, if the bound is too small, are dropped."""
    N, top_k = ids.shape
    ids_flat = ids.reshape(-1)
    offsets, chunk_prefix = _chunk_counts(ids_flat, num_experts)
    if max_rows is None:
        rows = int(offsets[-1])
        source = torch.empty(rows, dtype=torch.int64, device=ids.device)
    else:
        rows = int(max_rows)
        source = torch.full((rows,), -1, dtype=torch.int64, device=ids.device)
    out = torch.empty(rows, x.shape[1], dtype=x.dtype, device=x.device)
    if rows == 0:
        return Permutation(out, offsets, source, N, top_k)
    _scatter(ids_flat, offsets, chunk_prefix, source, 0)
    D = x.shape[1]
    if D:
        block_d = min(triton.next_power_of_2(D), 256 if INTERPRET else 512)
        block_r = 16 if INTERPRET else 4
        _gather_rows_kernel[(triton.cdiv(rows, block_r), triton.cdiv(D, block_d))](
            x, source, out, rows, D, top_k, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            BLOCK_R=block_r, BLOCK_D=block_d)
    return Permutation(out, offsets, source, N, top_k)


def moe_unpermute(y_sorted, p, weights):
    """y[n] = sum over present slots j of weights[n, j] * y_sorted[row of (n, j)], float32 sums in slot order,
    no atomics. y_sorted [M, D'] (M may be a moe_permute max_rows bound: rows with source -1 are ignored);
    weights [N, top_k]. Returns [N, D'] in y_sorted's dtype; tokens with no expert get 0."""
    num_slots = p.num_tokens * p.top_k
    row_of_slot = torch.full((num_slots,), -1, dtype=torch.int32, device=y_sorted.device)
    num_rows = p.source.shape[0]
    if num_rows:
        block = 256
        _invert_kernel[(triton.cdiv(num_rows, block),)](p.source, row_of_slot, num_rows, BLOCK=block)
    return _combine(y_sorted, row_of_slot, weights.contiguous(), p.num_tokens, p.top_k, rows_are_slots=False)


# ----------------------------------------------------------------------------------------------------------------
# The persistent grouped GEMM


@triton.jit
def _grouped_gemm_kernel(a_ptr, w_ptr, out_ptr, row_map_ptr, block_expert_ptr, num_blocks_ptr, row_scale_ptr,
                         N, K, a_row_div, up_offset,
                         stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
                         A_MAPPED: tl.constexpr, OUT_MAPPED: tl.constexpr, GATED: tl.constexpr,
                         SCALED: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Persistent: each program walks tiles pid, pid + programs, ... of the num_blocks * cdiv(N, BLOCK_N) tiles.

    Tile (b, n): positions p = b * BLOCK_M + [0, BLOCK_M) of the block-aligned layout, expert
    e = block_expert[b], present rows r = row_map[p] >= 0. It computes acc = A[rows] @ w[e, n-tile]^T over K
    with A rows a[r // a_row_div] (A_MAPPED: a gather fused into the loads) or a[p]; then
      GATED:  acc = silu(acc) * (A[rows] @ w[e, up_offset + n-tile]^T)   (SwiGLU; N = I)
      SCALED: acc *= row_scale[r]                                          (routing weight per slot)
    and stores it at out[r] (OUT_MAPPED) or out[p]. a [*, K]; w [E, *, K]; out [*, N]."""
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_tiles = tl.load(num_blocks_ptr) * num_n_tiles
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        block = tile // num_n_tiles
        cols = (tile % num_n_tiles) * BLOCK_N + offs_n
        col_ok = cols < N
        expert = tl.load(block_expert_ptr + block).to(tl.int64)
        positions = block.to(tl.int64) * BLOCK_M + offs_m
        mapped = tl.load(row_map_ptr + positions).to(tl.int64)
        present = mapped >= 0
        if A_MAPPED:
            a_rows = mapped // a_row_div
        else:
            a_rows = positions
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = w_ptr + expert * stride_we + cols.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if GATED:
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k
            a = tl.load(a_ptrs, mask=present[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc)
            if GATED:
                w_up = tl.load(w_ptrs + up_offset * stride_wn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc_up = tl.dot(a, w_up, acc_up)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
        if SCALED:
            acc *= tl.load(row_scale_ptr + mapped, mask=present, other=0.0)[:, None]
        if OUT_MAPPED:
            out_rows = mapped
        else:
            out_rows = positions
        tl.store(out_ptr + out_rows[:, None] * stride_om + cols[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=present[:, None] & col_ok[None, :])


# (BLOCK_N, BLOCK_K, num_warps, num_stages) candidates per BLOCK_M, for the GPU autotuner. The gated variant
# holds two accumulators and streams two weight tiles: with 128 x 128 tiles it spills at 4 warps and exceeds
# sm_90's shared memory at BLOCK_K = 128 (sm_90 compiles with 16-byte aligned arguments, as at launch), so those
# are left out.
GEMM_CONFIGS = {
    16: [(64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (32, 256, 4, 4)],
    64: [(128, 64, 4, 4), (64, 64, 4, 4), (128, 64, 8, 3)],
    128: [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (64, 128, 4, 3)],
}


# Weight matrices smaller than this (toy and test shapes) take the first config: compiling every candidate would
# cost more than it saves. The Qwen3.5 experts (512 x 2048 and up) are autotuned.
AUTOTUNE_MIN_NK = 1 << 20


@functools.cache
def _tuned_gemm(block_m):
    configs = [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
               for bn, bk, w, s in GEMM_CONFIGS[block_m]]
    return triton.autotune(configs, key=["N", "K", "A_MAPPED", "GATED"])(_grouped_gemm_kernel)


@functools.cache
def _num_sms(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _gemm_block_m(rows_per_expert):
    """BLOCK_M from the mean rows per expert (a host number: no synchronisation)."""
    if rows_per_expert <= DECODE_BLOCK_M:
        return DECODE_BLOCK_M
    return 64 if rows_per_expert <= 64 or INTERPRET else 128


def _launch_gemm(a, w, out, row_map, block_expert, num_blocks, *, N, K, block_m, a_mapped, a_row_div=1,
                 out_mapped, gated=False, up_offset=0, row_scale=None):
    """Runs _grouped_gemm_kernel over the block table (no host synchronisation: num_blocks stays on device)."""
    max_tiles = block_expert.numel() * triton.cdiv(N, 64)
    args = (a, w, out, row_map, block_expert, num_blocks, row_map if row_scale is None else row_scale,
            N, K, a_row_div, up_offset, a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
            out.stride(0), out.stride(1))
    flags = dict(A_MAPPED=a_mapped, OUT_MAPPED=out_mapped, GATED=gated, SCALED=row_scale is not None,
                 BLOCK_M=block_m)
    if INTERPRET:
        block_n = min(64, max(16, triton.next_power_of_2(N)))
        block_k = min(64, max(16, triton.next_power_of_2(K)))
        _grouped_gemm_kernel[(min(4, max_tiles),)](*args, **flags, BLOCK_N=block_n, BLOCK_K=block_k)
    else:
        # Decode tiles are small and memory-bound: two resident programs per SM keep more loads in flight.
        per_sm = 2 if block_m == DECODE_BLOCK_M else 1
        programs = min(per_sm * _num_sms(a.device.index or 0), max_tiles)
        if N * K >= AUTOTUNE_MIN_NK:
            _tuned_gemm(block_m)[(programs,)](*args, **flags)
        else:
            block_n, block_k, warps, stages = GEMM_CONFIGS[block_m][0]
            _grouped_gemm_kernel[(programs,)](*args, **flags, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                                              num_stages=stages)


def grouped_gemm(x, w, offsets, block_m=None):
    """y[offsets[e]:offsets[e + 1]] = x[same rows] @ w[e]^T. x [M, K] grouped by expert; w [E, N, K];
    offsets int [E + 1]. Returns [M, N] in x's dtype. block_m (16, 64 or 128) overrides the tile height,
    chosen otherwise from the mean rows per expert."""
    M, K = x.shape
    E, N, _ = w.shape
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()
    block_m = block_m or _gemm_block_m(M / E)
    max_blocks = max_aligned_blocks(M, E, block_m)
    row_map = torch.empty(max_blocks * block_m, dtype=torch.int32, device=x.device)
    block_expert, num_blocks = _block_table(offsets, row_map, max_blocks, block_m, contiguous=True)
    _launch_gemm(x, w, y, row_map, block_expert, num_blocks, N=N, K=K, block_m=block_m, a_mapped=True,
                 out_mapped=True)
    return y


# ----------------------------------------------------------------------------------------------------------------
# The fused expert layer


def moe(x, weights, ids, w_gate_up, w_down, path="auto"):
    """Qwen3.5 experts. x [N, D]; weights, ids [N, top_k] (-1 = no expert); w_gate_up [E, 2I, D];
    w_down [E, D, I]. Returns y [N, D] in x's dtype, with y[n] = sum_j weights[n, j] * silu(x W_g^T) * (x W_u^T)
    W_down^T. path: "decode" (BLOCK_M = 16), "prefill" (BLOCK_M = 64 / 128 from the mean rows per expert)
    or "auto" (decode up to 64 tokens). No host synchronisation."""
    if path not in ("auto", "decode", "prefill"):
        raise ValueError(f"path must be 'auto', 'decode' or 'prefill', got {path!r}")
    N, D = x.shape
    E, two_I, _ = w_gate_up.shape
    I = two_I // 2
    top_k = ids.shape[1]
    if N == 0 or I == 0 or D == 0:
        return torch.zeros_like(x)
    if path == "auto":
        path = "decode" if N <= DECODE_MAX_TOKENS else "prefill"
    num_slots = N * top_k
    block_m = DECODE_BLOCK_M if path == "decode" else max(64, _gemm_block_m(num_slots / E))
    row_map, block_expert, num_blocks, _ = align_slots(ids, E, block_m, one_program=path == "decode")
    h = torch.empty(row_map.numel(), I, dtype=x.dtype, device=x.device)
    _launch_gemm(x, w_gate_up, h, row_map, block_expert, num_blocks, N=I, K=D, block_m=block_m, a_mapped=True,
                 a_row_div=top_k, out_mapped=False, gated=True, up_offset=I)
    y_slots = torch.empty(num_slots, D, dtype=x.dtype, device=x.device)
    _launch_gemm(h, w_down, y_slots, row_map, block_expert, num_blocks, N=D, K=I, block_m=block_m,
                 a_mapped=False, out_mapped=True, row_scale=weights.to(torch.float32).reshape(-1).contiguous())
    return _combine(y_slots, ids.reshape(-1), None, N, top_k, rows_are_slots=True)


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time specs: every kernel at the Qwen3.5-35B-A3B layer shape in bf16 (hidden 2048, 256 experts, top-8,
# expert size 512), for profiling.static. Unit strides are constexpr 1, as Triton specialises them at launch.


def _spec(name, kernel, signature, constexprs, num_warps=4, num_stages=3, divisible_by_16=()):
    types = {arg: "constexpr" if arg in constexprs else kind for arg, kind in signature.items()}
    return AotSpec(name, f"kernels.triton.moe:{kernel}", types, constexprs, num_warps, num_stages, divisible_by_16)


def _aot_specs(D=2048, E=256, top_k=8, I=512, dt="bf16"):
    block_e = triton.next_power_of_2(E)
    i32 = "i32"
    specs = [
        _spec(f"moe.route[E={E},top_k={top_k},{dt}]", "_route_kernel",
              dict(logits_ptr=f"*{dt}", weights_ptr="*fp32", ids_ptr="*i32", N=i32, E=i32, stride_ln=i32,
                   stride_le=i32),
              dict(stride_le=1, TOP_K=top_k, RENORMALIZE=True, BLOCK_N=max(1, min(16, 4096 // block_e)),
                   BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k))),
        _spec(f"moe.count[E={E}]", "_count_kernel",
              dict(ids_ptr="*i32", chunk_counts_ptr="*i32", num_slots=i32, E=i32, slots_per_chunk=i32),
              dict(BLOCK_S=_slot_block(block_e, GPU_SLOT_BLOCK), BLOCK_E=block_e)),
        _spec(f"moe.scan[E={E}]", "_scan_kernel",
              dict(chunk_counts_ptr="*i32", offsets_ptr="*i32", num_chunks=i32, E=i32),
              dict(BLOCK_C=max(1, min(64, 8192 // block_e)), BLOCK_E=block_e)),
        _spec("moe.invert", "_invert_kernel", dict(source_ptr="*i64", row_of_slot_ptr="*i32", num_rows=i32),
              dict(BLOCK=256)),
        _spec(f"moe.gather_rows[D={D},{dt}]", "_gather_rows_kernel",
              dict(x_ptr=f"*{dt}", source_ptr="*i64", out_ptr=f"*{dt}", num_rows=i32, D=i32, top_k=i32,
                   stride_xn=i32, stride_xd=i32, stride_om=i32, stride_od=i32),
              dict(stride_xd=1, stride_od=1, BLOCK_R=4, BLOCK_D=512)),
    ]
    for dest, align_m in (("*i64", 0), ("*i32", DECODE_BLOCK_M), ("*i32", 128)):
        specs.append(_spec(f"moe.scatter[E={E},ALIGN_M={align_m}]", "_scatter_kernel",
                           dict(ids_ptr="*i32", chunk_prefix_ptr="*i32", offsets_ptr="*i32", dest_ptr=dest,
                                num_slots=i32, E=i32, slots_per_chunk=i32, dest_size=i32),
                           dict(ALIGN_M=align_m, BLOCK_S=_slot_block(block_e, GPU_SLOT_BLOCK),
                                BLOCK_E=block_e)))
    for contiguous, block_m in ((False, DECODE_BLOCK_M), (False, 128), (True, 128)):
        specs.append(_spec(f"moe.align[E={E},BLOCK_M={block_m},contiguous={contiguous}]", "_align_kernel",
                           dict(offsets_ptr="*i32", row_map_ptr="*i32", block_expert_ptr="*i32",
                                num_blocks_ptr="*i32", E=i32, max_blocks=i32),
                           dict(CONTIGUOUS=contiguous, BLOCK_M=block_m, BLOCK_B=_block_b(block_m),
                                BLOCK_E=block_e)))
    specs.append(_spec(f"moe.align_one_program[E={E},BLOCK_M={DECODE_BLOCK_M}]", "_align_one_program_kernel",
                       dict(ids_ptr="*i32", offsets_ptr="*i32", row_map_ptr="*i32", block_expert_ptr="*i32",
                            num_blocks_ptr="*i32", num_slots=i32, E=i32, max_blocks=i32),
                       dict(BLOCK_M=DECODE_BLOCK_M, BLOCK_S=_slot_block(block_e, GPU_SLOT_BLOCK),
                            BLOCK_B=_block_b(DECODE_BLOCK_M), BLOCK_E=block_e)))
    for label, slot_map, rows_are_slots in (("unpermute", "*i32", False), ("layer", "*i32", True)):
        specs.append(_spec(f"moe.combine[{label},D={D},{dt}]", "_combine_kernel",
                           dict(y_ptr=f"*{dt}", slot_map_ptr=slot_map, weights_ptr="*fp32", out_ptr=f"*{dt}",
                                N=i32, D=i32, top_k=i32, stride_ym=i32, stride_yd=i32, stride_on=i32,
                                stride_od=i32),
                           dict(stride_yd=1, stride_od=1, ROWS_ARE_SLOTS=rows_are_slots,
                                WEIGHTED=not rows_are_slots, BLOCK_T=1, BLOCK_D=1024)))
    gemm_signature = dict(a_ptr=f"*{dt}", w_ptr=f"*{dt}", out_ptr=f"*{dt}", row_map_ptr="*i32",
                          block_expert_ptr="*i32", num_blocks_ptr="*i32", row_scale_ptr="*fp32", N=i32, K=i32,
                          a_row_div=i32, up_offset=i32, stride_am=i32, stride_ak=i32, stride_we=i32, stride_wn=i32,
                          stride_wk=i32, stride_om=i32, stride_on=i32)
    unit = dict(stride_ak=1, stride_wk=1, stride_on=1)
    # at this shape every size and stride is a multiple of 16 but a_row_div (top_k = 8, or 1)
    multiples_of_16 = ("N", "K", "up_offset", "stride_am", "stride_we", "stride_wn", "stride_om")
    gate_up = dict(A_MAPPED=True, OUT_MAPPED=False, GATED=True, SCALED=False)
    down = dict(A_MAPPED=False, OUT_MAPPED=True, GATED=False, SCALED=True)
    plain = dict(A_MAPPED=True, OUT_MAPPED=True, GATED=False, SCALED=False)
    variants = [("gate_up", gate_up, block_m, config) for block_m in (DECODE_BLOCK_M, 128)
                for config in GEMM_CONFIGS[block_m]]
    variants += [("down", down, block_m, config) for block_m in (DECODE_BLOCK_M, 128)
                 for config in GEMM_CONFIGS[block_m]]
    variants += [("grouped", plain, 128, GEMM_CONFIGS[128][0])]
    shapes = {"gate_up": f"N={I},K={D}", "down": f"N={D},K={I}", "grouped": f"N={2 * I},K={D}"}
    for label, flags, block_m, (block_n, block_k, warps, stages) in variants:
        specs.append(_spec(f"moe.gemm[{label},{shapes[label]},{dt},BM={block_m},BN={block_n},BK={block_k},"
                           f"w={warps},s={stages}]", "_grouped_gemm_kernel", gemm_signature,
                           dict(unit, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k),
                           num_warps=warps, num_stages=stages, divisible_by_16=multiples_of_16))
    return specs


AOT_SPECS = _aot_specs()

"""The block-aligned layout of MoE slots in Triton: count, scan, scatter and the block table, shared by the
grouped GEMMs (kernellab.triton.grouped_gemm), the permutation (kernellab.triton.moe_permute) and the fused layer.

All on device, no host synchronisation:

    ids [N, top_k] --count--> chunk_counts [C, E] --scan--> offsets [E + 1], chunk_prefix [C, E]
        --scatter (stable)--> row_map [B * BLOCK_M]: the slot n * top_k + j at each position, expert e's rows
                              padded to a multiple of BLOCK_M (the "block-aligned" layout), -1 at padding
        --align--> block_expert [B] (one expert per block of BLOCK_M positions), num_blocks [1]

`moe_permute` uses count / scan / scatter without the padding; `grouped_gemm`, whose rows are grouped already,
builds the block table from its offsets (row_map[p] = offsets[e] + i). Each chunk of SLOTS_PER_CHUNK slots is
one program of the count and scatter kernels; the one-program scan turns the chunks' counts into their starts.

Decode (a few tokens) uses BLOCK_M = DECODE_BLOCK_M = 16, so 8 real rows are padded to 16, not to the prefill
tile, and one program does the count, scan, block table and scatter (four launches become one).
Row indices and program ids are cast to int64 before they multiply a stride (tensors past 2^31 elements).
"""
import torch
import triton
import triton.language as tl

from kernellab.triton import aot_spec
from kernellab.triton._autotune import INTERPRET

DECODE_BLOCK_M = 16
# Slots handled by one program of the count and scatter kernels (a multiple of SLOT_BLOCK). Small under the
# interpreter so that the tests cross chunk boundaries at small N.
GPU_SLOT_BLOCK = 32
SLOT_BLOCK = 16 if INTERPRET else GPU_SLOT_BLOCK
SLOTS_PER_CHUNK = 4 * SLOT_BLOCK if INTERPRET else 1024


def _slot_block(block_e, largest=SLOT_BLOCK):
    """Slots per step of the count and scatter kernels: their [slots, experts] one-hot tile stays <= 8192."""
    return min(largest, max(8, 8192 // block_e))


def _chunks_per_step(block_e):
    """Chunks per step of the scan kernel: its [chunks, experts] tile stays <= 8192."""
    return max(1, min(64, 8192 // block_e))


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


def expert_offsets(ids_flat, num_experts):
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
                       BLOCK_C=_chunks_per_step(block_e), BLOCK_E=block_e)
    return offsets, chunk_counts


def scatter(ids_flat, offsets, chunk_prefix, dest, align_m):
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


def block_table(offsets, row_map, max_blocks, block_m, contiguous):
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
        offsets, chunk_prefix = expert_offsets(ids_flat, num_experts)
        block_expert, num_blocks = block_table(offsets, row_map, max_blocks, block_m, contiguous=False)
        scatter(ids_flat, offsets, chunk_prefix, row_map, block_m)
        return row_map, block_expert, num_blocks, offsets
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=ids.device)
    num_blocks = torch.empty(1, dtype=torch.int32, device=ids.device)
    block_e = triton.next_power_of_2(num_experts)
    _align_one_program_kernel[(1,)](ids_flat, offsets, row_map, block_expert, num_blocks, ids_flat.numel(),
                                    num_experts, max_blocks, BLOCK_M=block_m, BLOCK_S=_slot_block(block_e),
                                    BLOCK_B=_block_b(block_m), BLOCK_E=block_e)
    return row_map, block_expert, num_blocks, offsets


def _aot_specs(E=256):
    """The layout's kernels for 256 experts (Qwen3.5-35B-A3B), at each configuration the MoE ops launch: the
    scatter unpadded (moe_permute) and padded to the decode and prefill tiles (the fused layer), the block table
    of slots (the fused layer) and of grouped rows (grouped_gemm)."""
    block_e = triton.next_power_of_2(E)
    slot_block = _slot_block(block_e, GPU_SLOT_BLOCK)
    specs = [
        aot_spec(f"moe_align.count[E={E}]", _count_kernel, dict(BLOCK_S=slot_block, BLOCK_E=block_e),
                 pointers=dict(ids_ptr="i32", chunk_counts_ptr="i32")),
        aot_spec(f"moe_align.scan[E={E}]", _scan_kernel, dict(BLOCK_C=_chunks_per_step(block_e), BLOCK_E=block_e),
                 pointers=dict(chunk_counts_ptr="i32", offsets_ptr="i32")),
    ]
    for dest, align_m in (("i64", 0), ("i32", DECODE_BLOCK_M), ("i32", 128)):
        specs.append(aot_spec(f"moe_align.scatter[E={E},ALIGN_M={align_m}]", _scatter_kernel,
                              dict(ALIGN_M=align_m, BLOCK_S=slot_block, BLOCK_E=block_e),
                              pointers=dict(ids_ptr="i32", chunk_prefix_ptr="i32", offsets_ptr="i32", dest_ptr=dest)))
    table = dict(offsets_ptr="i32", row_map_ptr="i32", block_expert_ptr="i32", num_blocks_ptr="i32")
    for contiguous, block_m in ((False, DECODE_BLOCK_M), (False, 128), (True, 128)):
        specs.append(aot_spec(f"moe_align.align[E={E},BLOCK_M={block_m},contiguous={contiguous}]", _align_kernel,
                              dict(CONTIGUOUS=contiguous, BLOCK_M=block_m, BLOCK_B=_block_b(block_m),
                                   BLOCK_E=block_e), pointers=table))
    specs.append(aot_spec(f"moe_align.align_one_program[E={E},BLOCK_M={DECODE_BLOCK_M}]", _align_one_program_kernel,
                          dict(BLOCK_M=DECODE_BLOCK_M, BLOCK_S=slot_block, BLOCK_B=_block_b(DECODE_BLOCK_M),
                               BLOCK_E=block_e), pointers=dict(table, ids_ptr="i32")))
    return specs


AOT_SPECS = _aot_specs()

"""Expert parallelism on torch.distributed: `moe_ep` (API.md, "Expert parallelism") and its two halves.

Shapes, on rank r of a group of W ranks: N_r tokens, D hidden, I expert size, E experts in all, E_r = E / W
experts per rank (rank r holds experts r * E_r .. (r + 1) * E_r - 1), top_k slots per token, M_r = this rank's
routed slots (ids >= 0), R_r = the rows it receives (slots of every rank routed to its experts).

The algorithm (one call of `moe_ep` = `check_inputs`, `dispatch`, the local experts, `combine`):
1. check_inputs: every rank checks its own inputs, then one all_gather of a small descriptor (its error if any,
   D, I, E_r, dtype, device type, the range of its ids) lets every rank run the same cross-rank checks and raise
   the same error: a bad input on one rank raises on all of them and none is left waiting in a collective.
2. dispatch: `kernellab.moe_permute` groups this rank's routed slots by global expert; the experts of a rank being
   contiguous, that also groups them by destination rank. One all_to_all_single of per-expert counts [E]
   (int64), then one of the rows [M_r, D] with uneven splits. -1 slots are never sent.
3. The local experts: `kernellab.moe` (the chosen backend) on the R_r received rows, one slot per row (top_k = 1,
   weight 1, exact).
4. combine: a second all_to_all_single returns the R_r output rows to where their tokens live, in the order
   they were sent, and `kernellab.moe_unpermute` sums each token's slots with its routing weights in slot order
   (float32 accumulation; deterministic, no atomics).

What travels, and why it is the cheapest: per routed slot, the x row out (D elements of x's dtype) and the
output row back (the same), nothing else. The local expert id of a row is not sent: the rows go sorted by
expert, so the per-expert counts (E int64 per rank and call, whatever the number of tokens) tell the receiver
which rows belong to which of its experts. The return address is not sent: all_to_all_single keeps the order
of the rows, so the results come back in the order the sender's Permutation holds (its `source`). The routing
weights are not sent at all: they stay where their token lives and weight the returned rows there, whereas
weighting on the expert's rank (as `kernellab.moe` does on one device) would cost one more value per slot.
At Qwen3.5-397B-A17B's D = 4096 in bfloat16 that is 8 KiB out and 8 KiB back per routed slot (a slot whose
expert is on its own rank is copied locally by the collective).

Precision: the output rows come back in x's dtype, so in float16 / bfloat16 each slot's expert output is
rounded once before the weighted sum (float32), where `kernellab.moe` on one device rounds only the sum: within
the dtype's tolerance, and half the bytes of sending float32 back.

Every rank of the group must call `moe_ep` (or the halves) with the same group; tensors must be on a device
the group's backend moves (CPU for gloo, the current CUDA device for NCCL).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

import kernellab
from kernellab import registry, validate
from kernellab.registry import BackendUnavailable
from kernellab.types import Permutation

__all__ = ["Dispatched", "check_inputs", "combine", "dispatch", "moe_ep"]

# The descriptor each rank contributes to check_inputs' all_gather: HEADER int64 fields, then an error message of
# up to MESSAGE_BYTES bytes of UTF-8 (longer messages are cut).
_ERROR, _D, _I, _EXPERTS, _DTYPE, _DEVICE, _IDS_CHECKED, _IDS_LO, _IDS_HI, _NUM_EXPERTS, HEADER = range(11)
MESSAGE_BYTES = 512
_ERRORS = (None, ValueError, BackendUnavailable)  # descriptor[_ERROR] indexes this
_DEVICE_TYPES = ("cpu", "cuda")


def _group_size_rank(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("kernellab.distributed needs torch.distributed initialised (init_process_group) first")
    return dist.get_world_size(group), dist.get_rank(group)


def _descriptor_device(group):
    """The device of check_inputs' descriptor: NCCL moves CUDA tensors only, every other backend CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _expert_backend(backend, x):
    """The callable of the moe backend `backend` ("auto" resolved for x's device), after the checks the registry
    would make only once the experts run (device, dtype): raised here, before any collective."""
    name = registry.auto_backend("moe", x.device) if backend == "auto" else backend
    fn = kernellab.get("moe", name)  # BackendUnavailable: no such backend, or it cannot run on this machine
    spec = registry.registered("moe")[name]
    if x.device.type not in spec.devices():
        raise BackendUnavailable(f"backend {name!r} of moe does not run on {x.device.type} tensors here")
    if x.dtype not in spec.dtypes:
        raise ValueError(f"backend {name!r} of moe does not take {x.dtype} inputs")
    return fn


def _num_experts_arg(num_experts):
    if num_experts is not None and (isinstance(num_experts, bool) or not isinstance(num_experts, int)
                                    or num_experts < 1):
        raise ValueError(f"num_experts must be None or a positive int, got {num_experts!r}")


def _describe(x, weights, ids, w_gate_up, w_down, backend, num_experts, device):
    """This rank's descriptor, int64 [HEADER + MESSAGE_BYTES / 8], and the expert callable (None on error)."""
    header = [0] * HEADER
    message, fn = "", None
    try:
        _num_experts_arg(num_experts)
        validate.moe_shapes(x, weights, ids, w_gate_up, w_down)
        fn = _expert_backend(backend, x)
        header[_NUM_EXPERTS] = -1 if num_experts is None else num_experts
        header[_EXPERTS], two_I, header[_D] = w_gate_up.shape
        header[_I] = two_I // 2
        header[_DTYPE] = validate.FLOAT_DTYPES.index(x.dtype)
        header[_DEVICE] = _DEVICE_TYPES.index(x.device.type) if x.device.type in _DEVICE_TYPES else -1
        if (found := validate.ids_range(ids)) is not None:
            header[_IDS_CHECKED] = 1
            header[_IDS_LO], header[_IDS_HI] = found
    except (ValueError, BackendUnavailable) as error:
        header[_ERROR] = 2 if isinstance(error, BackendUnavailable) else 1  # indexes _ERRORS
        message, fn = str(error), None
    text = message.encode("utf-8")[:MESSAGE_BYTES].ljust(MESSAGE_BYTES, b"\0")
    words = torch.frombuffer(bytearray(text), dtype=torch.uint8).view(torch.int64)
    return torch.cat([torch.tensor(header, dtype=torch.int64), words]).to(device), fn


def _differs(rows, field):
    return len({row[field] for row in rows}) > 1


def _cross_rank_error(rows, messages, world):
    """The error every rank raises, from the gathered descriptors (rows: their headers, one per rank), or None.
    The same inputs on every rank give the same answer, so all ranks raise together."""
    for rank, row in enumerate(rows):
        if row[_ERROR]:
            return _ERRORS[row[_ERROR]](f"{messages[rank]} (on rank {rank} of {world})")

    def per_rank(field):
        return ", ".join(str(row[field]) for row in rows)

    if _differs(rows, _EXPERTS):
        total = sum(row[_EXPERTS] for row in rows)
        split = "" if total % world == 0 else f"; E = {total} experts do not split evenly over {world} ranks"
        return ValueError(f"w_gate_up must hold E / world experts on every rank (the same count), got "
                          f"{per_rank(_EXPERTS)} on ranks 0..{world - 1}{split}")
    if rows[0][_EXPERTS] < 1:
        return ValueError("w_gate_up must hold at least one expert on every rank, got shape [0, 2I, D]")
    E = world * rows[0][_EXPERTS]
    for rank, row in enumerate(rows):
        given = row[_NUM_EXPERTS]
        if given == -1:
            continue
        if given % world:
            return ValueError(f"num_experts = {given} is not divisible by the world size {world} (on rank {rank})")
        if given != E:
            return ValueError(f"num_experts = {given} but w_gate_up holds {rows[0][_EXPERTS]} experts on each of "
                              f"{world} ranks, E = {E} (on rank {rank})")
    if _differs(rows, _D):
        return ValueError(f"x must have the same D (hidden size) on every rank, got {per_rank(_D)} on ranks "
                          f"0..{world - 1}")
    if _differs(rows, _I):
        return ValueError(f"w_gate_up and w_down must have the same I (expert size) on every rank, got "
                          f"{per_rank(_I)} on ranks 0..{world - 1}")
    if _differs(rows, _DTYPE):
        names = ", ".join(str(validate.FLOAT_DTYPES[row[_DTYPE]]).removeprefix("torch.") for row in rows)
        return ValueError(f"x must have the same dtype on every rank, got {names} on ranks 0..{world - 1}")
    if _differs(rows, _DEVICE):
        names = ", ".join(_DEVICE_TYPES[row[_DEVICE]] if row[_DEVICE] >= 0 else "other" for row in rows)
        return ValueError(f"x must be on the same device type on every rank, got {names} on ranks 0..{world - 1}")
    for rank, row in enumerate(rows):
        if row[_IDS_CHECKED]:
            try:
                validate.check_ids_range(row[_IDS_LO], row[_IDS_HI], E, where=f" (on rank {rank} of {world})")
            except ValueError as error:
                return error
    return None


def check_inputs(x, weights, ids, w_gate_up, w_down, group=None, backend="auto", num_experts=None):
    """The checks of moe_ep, on every rank of group together (one all_gather of world * (HEADER + 64) int64).

    Arguments as moe_ep's. Every rank raises the same ValueError naming the argument (or BackendUnavailable)
    when any rank's inputs are bad: its own checks (as kernellab.moe's), then D, I, dtype, device type and the
    expert count E_r = w_gate_up.shape[0] the same on every rank, num_experts (if given) = world * E_r, ids of
    every rank in [-1, E). Returns (E, the local moe backend's callable)."""
    world, _ = _group_size_rank(group)
    mine, fn = _describe(x, weights, ids, w_gate_up, w_down, backend, num_experts, _descriptor_device(group))
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()
    rows = table[:, :HEADER].tolist()
    messages = [table[rank, HEADER:].numpy().tobytes().rstrip(b"\0").decode("utf-8", "replace")
                for rank in range(world)]
    error = _cross_rank_error(rows, messages, world)
    if error is not None:
        raise error
    return world * rows[0][_EXPERTS], fn


@dataclass
class Dispatched:
    """What dispatch returns and combine needs, on one rank (W ranks, E_r experts each).

    x:           [R, D] the rows this rank received, from rank 0's first, then rank 1's, ...; within one source
                 rank grouped by local expert in ascending order (and in the source's slot order).
    ids:         int32 [R, 1] the local expert (0 .. E_r - 1) of each row: kernellab.moe's ids with top_k = 1.
    permutation: this rank's own routed slots grouped by expert (kernellab.Permutation, M rows): its `x` [M, D]
                 is what was sent, in that order, and combine receives the results into it (the sent rows are
                 no longer needed: no second [M, D] buffer); its `source` maps them back to their slots.
    send_splits: [W] rows sent to each rank (and returned by it).
    recv_splits: [W] rows received from each rank (and returned to it); sum = R.
    recv_counts: int64 [W, E_r] rows received per (source rank, local expert).
    group, permute_backend: the process group and the moe_permute / moe_unpermute backend.
    """

    x: torch.Tensor
    ids: torch.Tensor
    permutation: Permutation
    send_splits: list[int]
    recv_splits: list[int]
    recv_counts: torch.Tensor
    group: object
    permute_backend: str


def dispatch(x, ids, num_experts, group=None, permute_backend="auto"):
    """Send this rank's routed slots to the ranks of their experts. x [N, D]; ids [N, top_k] global in [-1, E),
    E = num_experts, W = the group's size, E % W == 0. Returns a Dispatched (its x [R, D], ids int32 [R, 1]).

    Two all_to_all_single: the per-expert counts (int64 [E], E / W to each rank), then the rows (uneven splits);
    one host synchronisation for the split sizes. Inputs are trusted (check_inputs checks them for every rank
    together): a bad input here raises on this rank only and can leave the others waiting in a collective."""
    world, _ = _group_size_rank(group)
    local_experts = num_experts // world
    p = kernellab.moe_permute(x, ids, num_experts, backend=permute_backend)
    send_counts = p.offsets.diff().to(torch.int64)  # [E]: rows of each expert, grouped by destination rank
    recv_counts = torch.empty_like(send_counts)  # [W * E_r]: rows from each source rank for each local expert
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    recv_counts = recv_counts.view(world, local_experts)
    splits = torch.cat([send_counts.view(world, local_experts).sum(1), recv_counts.sum(1)]).tolist()
    send_splits, recv_splits = splits[:world], splits[world:]
    received = x.new_empty(sum(recv_splits), x.shape[1])
    dist.all_to_all_single(received, p.x, output_split_sizes=recv_splits, input_split_sizes=send_splits,
                           group=group)
    experts = torch.arange(local_experts, dtype=torch.int32, device=x.device).repeat(world)
    local_ids = torch.repeat_interleave(experts, recv_counts.reshape(-1), output_size=received.shape[0])
    return Dispatched(received, local_ids.view(-1, 1), p, send_splits, recv_splits, recv_counts, group,
                      permute_backend)


def combine(y, weights, d):
    """Return the expert outputs to where their tokens live and sum them with the routing weights.
    y [R, D]: the output row of each row of d.x, in that order, in x's dtype; weights [N, top_k] (this rank's);
    d: the Dispatched of this call. Returns [N, D] in y's dtype: out[n] = sum over j with ids[n, j] >= 0 of
    weights[n, j] * (output of slot (n, j)), summed in slot order; tokens without a routed slot are 0.

    One all_to_all_single (the splits of dispatch, reversed), received into d.permutation.x. Inputs are trusted,
    as dispatch's."""
    p = d.permutation
    if tuple(y.shape) != tuple(d.x.shape) or y.dtype != p.x.dtype:
        raise ValueError(f"y must be [R, D] = {tuple(d.x.shape)} in {p.x.dtype} (one output row per received "
                         f"row), got {tuple(y.shape)} in {y.dtype}")
    dist.all_to_all_single(p.x, y.contiguous(), output_split_sizes=d.send_splits, input_split_sizes=d.recv_splits,
                           group=d.group)
    return kernellab.moe_unpermute(p.x, p, weights, backend=d.permute_backend)


def moe_ep(x, weights, ids, w_gate_up, w_down, group=None, backend="auto", num_experts=None,
           permute_backend="auto"):
    """The MoE layer with experts spread over the ranks of `group` (default: the world), W ranks.

    On each rank: x [N_r, D] (N_r may be 0), weights and ids [N_r, top_k] of this rank's tokens, ids global in
    [-1, E); w_gate_up [E / W, 2I, D] and w_down [E / W, D, I]: experts r * E / W .. (r + 1) * E / W - 1 of rank r.
    E = num_experts if given (it must equal W * w_gate_up.shape[0]), else W * w_gate_up.shape[0].
    backend: the moe backend of the local experts ("auto" as kernellab.moe); permute_backend: that of
    moe_permute / moe_unpermute. Returns y [N_r, D] in x's dtype: kernellab.moe on one device with all E experts,
    for this rank's tokens.

    Every rank must call it. Bad input on any rank raises the same error on every rank before any collective
    but check_inputs' all_gather (see the module's docstring for what is sent)."""
    E, experts = check_inputs(x, weights, ids, w_gate_up, w_down, group, backend, num_experts)
    d = dispatch(x, ids, E, group, permute_backend)
    if d.x.shape[0]:
        y = experts(d.x, torch.ones(d.ids.shape, dtype=torch.float32, device=x.device), d.ids, w_gate_up, w_down)
    else:  # nothing routed here: no backend call on empty inputs
        y = d.x
    return combine(y, weights, d)

"""The serving keywords of the linear attentions (docs/api.md, "Serving keywords of gated_delta_rule and
linear_attention (and kda)"): a pool of states read and written in place (state_indices), the states kept along
the way (output_intermediate_states for speculative verify, chunk_states_every for a prefix cache), fused gating
(A_log, dt_bias, beta_logits); and kernellab.commit_states.

The pieces every backend that declares these keywords shares (kernellab.registry.Backend.serving), so that each
computes only what is its own (the states it keeps on the way):
- `gates`: g and beta from the raw inputs (fused gating), at the top of the backend, differentiable;
- `Pool`: the pool's rows read (index_select of the rows indexed only, zeros for a -1 slot) and the final states
  written back in place (index_copy_ of those rows only: no copy of the pool);
- `kept_rows` and `finish`: the kept states in the trace's order, padding slots zeroed, the pool written, the
  result tuple built (o, S) or (o, S, StateTrace).
`differentiable` runs a call that needs gradients on a backend with a backward of its own (kernellab.autograd): the
gating and the gather under autograd, the backend on the plain inputs, the write back without autograd.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernellab import validate
from kernellab.types import StateTrace

# Every serving keyword and its default (the value that leaves a call as it was before they existed). A checked
# call (kernellab.validate) carries only those it sets.
DEFAULTS = validate.SERVING_DEFAULTS
KEYWORDS = frozenset(DEFAULTS)
# The ops that take them (the linear attentions).
OPS = ("gated_delta_rule", "kda", "linear_attention")
# chunk_states_every is a multiple of this for the reference, torch and mkl (the chunk of the lab's CPU backends).
CHUNK_MULTIPLE = 64


def requested(checked: dict) -> tuple[str, ...]:
    """The serving keywords a checked call sets (kernellab.validate keeps only those)."""
    return tuple(name for name in checked if name in KEYWORDS)


def check_every(chunk_states_every: int | None, chunk: int, backend: str) -> None:
    """ValueError naming chunk_states_every unless it is None or a multiple of the backend's chunk."""
    if chunk_states_every is not None and chunk_states_every % chunk:
        raise ValueError(f"chunk_states_every must be a multiple of backend {backend!r}'s chunk size {chunk}, got "
                         f"{chunk_states_every}")


def gates(g, beta, A_log, dt_bias, beta_logits, dtype, by_token=False):
    """Fused gating, in dtype (float32; float64 for float64 inputs), differentiable. A_log [Hv] and dt_bias ([Hv],
    or [Hv, K] with g [B, T, Hv, K]): g holds the raw gate input a and becomes -exp(A_log) softplus(a + dt_bias)
    (torch's softplus: beta 1, threshold 20), raised to validate.LOG_DECAY_MIN where below (as validate raises a
    given g). beta_logits: beta becomes sigmoid(beta). Returns (g, beta), each as given when not fused.
    by_token: one token (g[:, t]) at a time, each as a call with T = 1 computes it: torch's elementwise CPU
    kernels round the vectorised body and the scalar tail of a tensor differently, so that a value depends on
    its place in the tensor; a verify of T tokens so gates them bitwise as T decode calls."""
    if by_token and (A_log is not None or beta_logits):
        steps = [gates(g[:, t:t + 1], beta[:, t:t + 1] if beta_logits else None, A_log, dt_bias, beta_logits, dtype)
                 for t in range(g.shape[1])]
        return (torch.cat([step[0] for step in steps], dim=1),
                torch.cat([step[1] for step in steps], dim=1) if beta_logits else beta)
    # (inputs made contiguous: the same values in the same layout round the same way)
    if A_log is not None:
        decay = A_log.to(dtype).exp()
        decay = decay[:, None] if g.ndim == 4 else decay  # kda: one A_log per head, one dt_bias per key channel
        a = g.to(dtype).contiguous()
        g = (-decay * torch.nn.functional.softplus(a + dt_bias.to(dtype))).clamp(min=validate.LOG_DECAY_MIN)
    if beta_logits:
        beta = torch.sigmoid(beta.to(dtype).contiguous())
    return g, beta


class Pool:
    """A call's pool of states: pool [P, Hv, K, V], state_indices int [N] (-1: a padding slot), the rows written
    targets [N] (output_state_indices, else state_indices; -1 for a padding slot)."""

    def __init__(self, pool, state_indices, output_state_indices):
        self.pool, self.indices = pool, state_indices
        self.padding = state_indices < 0
        self.padded = bool(self.padding.any())  # (read once: without padding, read and write copy each row once)
        written = state_indices if output_state_indices is None else output_state_indices
        self.targets = torch.where(self.padding, -1, written)
        self.skips = bool((self.targets < 0).any())  # a padding slot, or -1 in output_state_indices

    def read(self) -> torch.Tensor:
        """The initial states [N, Hv, K, V]: the rows indexed (index_select: row 0 stands in for a padding slot,
        then zeroed in place, the only copy of the rows). Differentiable in the pool: its gradient reaches the rows
        read. The result is the call's own (a backend may update it in place)."""
        rows = self.pool.index_select(0, self.indices.clamp(min=0))
        return rows.masked_fill_(self.padding[:, None, None, None], 0) if self.padded else rows

    @torch.no_grad()
    def write(self, final: torch.Tensor) -> None:
        """pool[targets[n]] = final[n] ([N, Hv, K, V]) in place for targets[n] >= 0 (not differentiable: serving);
        other rows untouched."""
        final = final.to(self.pool.dtype)
        if not self.skips:  # every row written: no masked copy of the states first
            self.pool.index_copy_(0, self.targets.long(), final)
            return
        keep = self.targets >= 0
        self.pool.index_copy_(0, self.targets[keep].long(), final[keep])


def lengths(B: int, T: int, cu_seqlens) -> torch.Tensor:
    """int64 [N]: the tokens of each sequence (B rows of T, or cu_seqlens' spans), on the host."""
    if cu_seqlens is None:
        return torch.full((B,), T, dtype=torch.int64)
    return cu_seqlens.cpu().long().diff()


def trace_index(counts: torch.Tensor, every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The trace's rows for counts [N] kept states per sequence, one every `every` tokens: (sequence, position)
    int64 [M], in order of sequence then position, position = every, 2 every, ..."""
    sequence = torch.repeat_interleave(torch.arange(counts.shape[0]), counts)
    first = torch.cumsum(counts, 0) - counts
    return sequence, (torch.arange(sequence.shape[0]) - first[sequence] + 1) * every


def kept_rows(kept: torch.Tensor, sizes: torch.Tensor, every: int) -> torch.Tensor:
    """States kept at a stride along time -> the trace's rows. kept [J, N, ...]: kept[j, n] the state of
    sequence n after (j + 1) every tokens (whatever it holds past the sequence's end); sizes [N] the sequences'
    lengths. Returns [M, ...] with the rows (n, j) where (j + 1) every <= sizes[n], in order of n then j."""
    J = kept.shape[0]
    wanted = (torch.arange(1, J + 1)[None, :] * every <= sizes[:, None]).to(kept.device)  # [N, J]
    return kept.transpose(0, 1)[wanted]


class Keep:
    """The states a pass keeps on its way: after every `every`-th step (a token, or a chunk of the chunked form),
    counted from the sequences' start, the pass calls `due()` after each step and `add(state)` when it says so;
    `rows` gives them in the trace's order. state: the N sequences' states, N Hv K V elements in that order (any
    strides: copied)."""

    def __init__(self, every: int):
        self.every, self.steps, self.states = every, 0, []

    def due(self) -> bool:
        self.steps += 1
        return self.steps % self.every == 0

    def add(self, state: torch.Tensor) -> None:
        self.states.append(state.clone(memory_format=torch.contiguous_format))

    def rows(self, sizes: torch.Tensor, tokens: int, like: torch.Tensor) -> torch.Tensor:
        """The kept states [M, Hv, K, V] (kept_rows' order): sizes [N] the sequences' lengths, tokens the tokens
        per step (1, or the chunk size), like a state [N, Hv, K, V] (for an empty result's shape)."""
        if not self.states:
            return like.new_zeros(0, *like.shape[1:])
        return kept_rows(torch.stack(self.states).view(-1, *like.shape), sizes, self.every * tokens)


def every_of(output_intermediate_states: bool, chunk_states_every: int | None) -> int | None:
    """The stride at which a call keeps states: 1 (every token), chunk_states_every, or None (no trace)."""
    return 1 if output_intermediate_states else chunk_states_every


def finish(o, final, kept, *, pool: Pool | None, every: int | None, output_intermediate_states: bool,
           output_final_state: bool, sizes: torch.Tensor, state_dtype, cu_seqlens):
    """A serving call's result from what the backend computed: o [B, T, Hv, V]; final [N, Hv, K, V] (the final
    states; None when neither the pool nor the caller needs them, or when the backend wrote the pool in place
    itself); kept [M, Hv, K, V] (kept_rows' order; None
    without a trace). A padding slot's output rows and kept states are zeroed (out of place where they require
    grad); the pool is written (not for output_intermediate_states: a verify call leaves it untouched).
    Returns (o, S) or (o, S, StateTrace), S None with a pool."""
    if pool is not None:
        if pool.padded:
            tokens = pool.padding.repeat_interleave(sizes.to(pool.padding.device), output_size=o.shape[0] * o.shape[1])
            o = _zero(o, tokens.view(o.shape[0], o.shape[1]))
            if kept is not None:
                kept = _zero(kept, pool.padding[trace_index(sizes // every, every)[0].to(kept.device)])
        if not output_intermediate_states and final is not None:
            pool.write(final)
        final = None
    elif final is not None:
        final = final.to(state_dtype) if output_final_state else None
    if every is None:
        return o, final
    sequence, position = trace_index(sizes // every, every)
    return o, final, StateTrace(kept.detach().to(state_dtype), sequence.to(o.device), position.to(o.device))


def _zero(x, rows):
    """x with the leading-index rows where `rows` is True set to 0: in place unless x requires grad."""
    mask = rows.reshape(*rows.shape, *([1] * (x.ndim - rows.ndim)))
    return x.masked_fill(mask, 0) if x.requires_grad else x.masked_fill_(mask, 0)


def serve(loop, backend: str, chunk: int, B: int, T: int, initial_state, output_final_state, cu_seqlens, state_dtype,
          state_indices, output_state_indices, output_intermediate_states, chunk_states_every):
    """A linear attention's call with its serving keywords, on a backend whose computation is loop(s0, every) ->
    (o [B, T, H, V], final [N, H, K, V], kept [M, H, K, V] or None): s0 the initial states [N, H, K, V] (None:
    zeros), every the stride at which it keeps the state after a sequence's token (None: none; kept in order of
    sequence then position, kept_rows'). chunk: what chunk_states_every must be a multiple of (check_every).
    The pool's rows are read first (Pool.read, differentiable) and written back after (Pool.write).
    Returns (o, S) or (o, S, StateTrace), as the op."""
    check_every(chunk_states_every, chunk, backend)
    pool = None if state_indices is None else Pool(initial_state, state_indices, output_state_indices)
    every = every_of(output_intermediate_states, chunk_states_every)
    o, final, kept = loop(initial_state if pool is None else pool.read(), every)
    return finish(o, final, kept, pool=pool, every=every, output_intermediate_states=output_intermediate_states,
                  output_final_state=output_final_state, sizes=lengths(B, T, cu_seqlens), state_dtype=state_dtype,
                  cu_seqlens=cu_seqlens)


@dataclass
class StateArguments:
    """A call's states for a GPU backend's kernels, and what finish needs after. kernel: h0, h0_index, h0_stride (the
    initial states: row h0_index[n] (n when None; -1: none, zeros) of h0, rows h0_stride elements apart, each
    [HV, K, V] contiguous); ht, ht_index, ht_stride (the final states, written the same way; ht_index[n] = -1: not
    written); kept, kept_offsets, every (kept [M, HV, K, V]: the state after every `every`-th step of sequence n
    goes to row kept_offsets[n] + j, j = 0, 1, ..., in kept_rows' order)."""
    kernel: dict
    pool: Pool | None
    final: torch.Tensor | None  # the final states for finish (None when the kernel wrote the pool)
    kept: torch.Tensor | None
    every: int | None
    sizes: torch.Tensor | None

    def finish(self, o, output_intermediate_states, output_final_state, state_dtype, cu_seqlens):
        """finish: (o, S) or (o, S, StateTrace); padding slots' outputs zeroed, the pool written where the
        kernel did not."""
        return finish(o, self.final, self.kept, pool=self.pool, every=self.every,
                      output_intermediate_states=output_intermediate_states, output_final_state=output_final_state,
                      sizes=self.sizes, state_dtype=state_dtype, cu_seqlens=cu_seqlens)


def _rows_contiguous(pool):
    """Whether each row [HV, K, V] of a pool is contiguous (the kernels index rows by one stride)."""
    HV, K, V = pool.shape[1:]
    return pool.stride(3) == 1 and pool.stride(2) == V and pool.stride(1) == K * V


def state_arguments(initial_state, output_final_state, state_dtype, N, HV, K, V, B, T, cu_seqlens, like, step=1,
                    state_indices=None, output_state_indices=None, output_intermediate_states=False,
                    chunk_states_every=None, *, backend: str):
    """The kernels' state arguments of a call: initial_state None, [N, HV, K, V] or a pool [P, HV, K, V] (with
    state_indices int [N]); step: the tokens per step of the kernel's walk (1, or its chunk), the stride of the
    kept states in steps being every // step. A pool whose rows are contiguous is read and written by the kernels
    in place (row state_indices[n] back to itself); with output_state_indices the kernel writes its final states
    to a buffer that Pool.write copies (one program's row may be another's read row). A verify
    (output_intermediate_states) leaves the pool unwritten. like: a tensor on the device. backend: its name, for
    the check of chunk_states_every (a multiple of CHUNK_MULTIPLE, the chunk of triton and cuda too)."""
    every = every_of(output_intermediate_states, chunk_states_every)
    check_every(chunk_states_every, CHUNK_MULTIPLE, backend)
    plain = HV * K * V
    pool = None if state_indices is None else Pool(initial_state, state_indices, output_state_indices)
    args = dict(h0=None, h0_index=None, h0_stride=plain, ht=None, ht_index=None, ht_stride=plain, kept=None,
                kept_offsets=None, every=1)
    final = kept = sizes = None
    new_states = lambda rows: like.new_empty(rows, HV, K, V, dtype=state_dtype)  # noqa: E731
    if pool is not None and _rows_contiguous(initial_state):
        index = state_indices.to(torch.int32).contiguous()
        args.update(h0=initial_state, h0_index=index, h0_stride=initial_state.stride(0))
        if not output_intermediate_states:
            if output_state_indices is None:
                args.update(ht=initial_state, ht_index=index, ht_stride=initial_state.stride(0))
            else:
                final = args["ht"] = new_states(N)
    elif pool is not None:  # rows of their own strides: gathered, and written back by Pool.write
        args["h0"] = pool.read().to(state_dtype).contiguous()
        if not output_intermediate_states:
            final = args["ht"] = new_states(N)
    else:
        args["h0"] = None if initial_state is None else initial_state.to(state_dtype).contiguous()
        if output_final_state:
            final = args["ht"] = new_states(N)
    if pool is not None or every is not None:
        sizes = lengths(B, T, cu_seqlens)
    if every is not None:
        counts = sizes // every
        kept = new_states(int(counts.sum()))
        args.update(kept=kept, kept_offsets=F.pad(counts.cumsum(0), (1, 0)).to(like.device, torch.int32),
                    every=every // step)
    return StateArguments(args, pool, final, kept, every, sizes)


def differentiable(run, impl, arguments: dict):
    """A serving call that needs gradients, on a backend with a backward of its own (kernellab.autograd):
    run(plain arguments) -> (o, S) is the backend under autograd on the op's plain arguments; impl(**arguments)
    its forward. Fused gating (`gates`) and the pool's read (`Pool.read`) run under autograd, so the gradients
    reach a, A_log, dt_bias, the beta logits and the pool rows read; the final states are written back without
    autograd. A trace comes from a second call of the forward, without gradients (it carries none)."""
    plain = {name: value for name, value in arguments.items() if name not in KEYWORDS}
    v = plain["v"]
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    plain["g"], beta = gates(plain["g"], plain.get("beta"), arguments.get("A_log"), arguments.get("dt_bias"),
                             arguments.get("beta_logits", False), dtype)
    if "beta" in plain:
        plain["beta"] = beta
    pool = None
    if arguments.get("state_indices") is not None:
        pool = Pool(plain["initial_state"], arguments["state_indices"], arguments.get("output_state_indices"))
        plain["initial_state"] = pool.read()
    intermediate = arguments.get("output_intermediate_states", False)
    every = every_of(intermediate, arguments.get("chunk_states_every"))
    kept = None
    if every is not None:
        with torch.no_grad():
            traced = {name: (x.detach() if isinstance(x, torch.Tensor) else x) for name, x in plain.items()}
            kept = impl(**traced, output_intermediate_states=intermediate,
                        chunk_states_every=arguments.get("chunk_states_every"))[2].states
    wanted = plain["output_final_state"]
    plain["output_final_state"] = wanted or pool is not None
    o, final = run(plain)
    sizes = lengths(v.shape[0], v.shape[1], plain["cu_seqlens"])
    return finish(o, final, kept, pool=pool, every=every, output_intermediate_states=intermediate,
                  output_final_state=wanted, sizes=sizes, state_dtype=plain["state_dtype"],
                  cu_seqlens=plain["cu_seqlens"])


def commit_states(pool, states, state_indices, cu_seqlens, accepted):
    """Commit the accepted prefix of a verify call: pool [P, Hv, K, V]; states [M, Hv, K, V] (a verify call's
    trace.states, one row per token, packed as the tokens); state_indices int [N] (-1: skip); cu_seqlens int
    [N + 1] (each sequence's rows in states); accepted int [N], 0 <= accepted[n] <= its length. Writes
    pool[state_indices[n]] = states[cu_seqlens[n] + accepted[n] - 1] in place for every n with accepted[n] > 0 and
    state_indices[n] >= 0 (accepted 0 leaves the row as it was); not differentiable. ValueError naming the
    argument on bad input, nothing written. Returns the pool."""
    validate.commit_states(pool, states, state_indices, cu_seqlens, accepted)
    accepted = accepted.to(states.device).long()
    chosen = (accepted > 0) & (state_indices >= 0)
    rows = cu_seqlens[:-1].to(states.device).long() + accepted - 1
    with torch.no_grad():
        pool.index_copy_(0, state_indices[chosen].long(), states[rows[chosen]].to(pool.dtype))
    return pool

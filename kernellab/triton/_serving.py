"""The serving keywords on the Triton kernels (docs/api.md "Serving keywords"; kernellab/serving.py the pieces every
backend shares): the kernels read a pool's rows where they lie (state_indices: an int32 pointer, a row of -1 a
padding slot), write the final states back in place, store the states they keep on the way (every token for a
verify, every few chunks for a prefix cache), and compute fused gating in float32 as they load g and beta.

The arguments every state-carrying kernel takes (StateArguments.kernel):
    h0, h0_index, h0_stride  the initial states: row h0_index[n] (n when not given; -1: none, zeros) of h0, rows
                             h0_stride elements apart, each [HV, K, V] contiguous;
    ht, ht_index, ht_stride  the final states, written the same way (ht_index[n] = -1: not written);
    kept, kept_offsets, every  kept [M, HV, K, V]: the state after every `every`-th step of sequence n goes to row
                             kept_offsets[n] + j (j = 0, 1, ...), in the trace's order (serving.kept_rows').
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernellab import serving
from kernellab.validate import LOG_DECAY_MIN

_LOG_DECAY_MIN = tl.constexpr(LOG_DECAY_MIN)
# The element types of these arguments in the sm_90 static table's specs (kernellab.triton.aot_spec): float32 states.
STATE_POINTERS = dict(h0_index="i32", ht_index="i32", kept="fp32", kept_offsets="i32")
GATE_POINTERS = dict(A_log="fp32", dt_bias="fp32")


@triton.jit
def softplus(x):
    """torch's softplus (beta 1, threshold 20) in float32: log1p(exp(x)), x above 20. log1p(y) as
    log(u) y / (u - 1) with u = 1 + y (Goldberg's form: a few ulps, y itself where u rounds to 1)."""
    y = tl.exp(tl.minimum(x, 20.))
    u = 1. + y
    return tl.where(x > 20., x, tl.where(u == 1., y, tl.log(u) * (y / tl.where(u == 1., 1., u - 1.))))


@triton.jit
def fused_gate(a, A_log, dt_bias):
    """g = -exp(A_log) softplus(a + dt_bias) in float32, raised to validate.LOG_DECAY_MIN (as serving.gates)."""
    g = -tl.exp(A_log.to(tl.float32)) * softplus(a.to(tl.float32) + dt_bias.to(tl.float32))
    return tl.maximum(g, _LOG_DECAY_MIN)


@triton.jit
def state_row(index, i_n, USE_INDEX: tl.constexpr):
    """The pool row of sequence i_n: index[i_n] (int64; -1 a padding slot), or i_n without an index."""
    if USE_INDEX:
        return tl.load(index + i_n).to(tl.int64)
    else:
        return i_n


@triton.jit
def load_state(h0, row, stride, offsets, mask, USE_INDEX: tl.constexpr):
    """The float32 slice at `offsets` of state row `row` (rows `stride` elements apart); zeros for row -1 (an
    indexed row: USE_INDEX)."""
    if USE_INDEX:
        b_h = tl.load(h0 + tl.maximum(row, 0) * stride + offsets, mask=mask, other=0.).to(tl.float32)
        return tl.where(row >= 0, b_h, 0.)
    else:
        return tl.load(h0 + row * stride + offsets, mask=mask, other=0.).to(tl.float32)


@triton.jit
def store_state(ht, row, stride, offsets, b_h, mask, USE_INDEX: tl.constexpr):
    """Store the slice b_h at `offsets` of state row `row` (rows `stride` elements apart); nothing for row -1 (an
    indexed row: USE_INDEX)."""
    if USE_INDEX:
        if row >= 0:
            tl.store(ht + row * stride + offsets, b_h.to(ht.dtype.element_ty), mask=mask)
    else:
        tl.store(ht + row * stride + offsets, b_h.to(ht.dtype.element_ty), mask=mask)


@triton.jit
def keep_state(kept, kept_offsets, i_n, step, every, offsets, b_h, mask, STATE: tl.constexpr):
    """Store b_h (the slice at `offsets` of a state of STATE elements) as sequence i_n's kept state after its step
    `step` (1-based) when `step` is a multiple of `every`."""
    if step % every == 0:
        row = tl.load(kept_offsets + i_n).to(tl.int64) + step // every - 1
        tl.store(kept + row * STATE + offsets, b_h.to(kept.dtype.element_ty), mask=mask)


@dataclass
class StateArguments:
    """A call's states for the kernels (the module docstring's arguments), and what serving.finish needs after."""
    kernel: dict
    pool: serving.Pool | None
    final: torch.Tensor | None  # the final states for serving.finish (None when the kernel wrote the pool)
    kept: torch.Tensor | None
    every: int | None
    sizes: torch.Tensor | None

    def finish(self, o, output_intermediate_states, output_final_state, state_dtype, cu_seqlens):
        """serving.finish: (o, S) or (o, S, StateTrace); padding slots' outputs zeroed, the pool written where the
        kernel did not."""
        return serving.finish(o, self.final, self.kept, pool=self.pool, every=self.every,
                              output_intermediate_states=output_intermediate_states,
                              output_final_state=output_final_state, sizes=self.sizes, state_dtype=state_dtype,
                              cu_seqlens=cu_seqlens)


def _rows_contiguous(pool):
    """Whether each row [HV, K, V] of a pool is contiguous (the kernels index rows by one stride)."""
    HV, K, V = pool.shape[1:]
    return pool.stride(3) == 1 and pool.stride(2) == V and pool.stride(1) == K * V


def state_arguments(initial_state, output_final_state, state_dtype, N, HV, K, V, B, T, cu_seqlens, like, step=1,
                    state_indices=None, output_state_indices=None, output_intermediate_states=False,
                    chunk_states_every=None):
    """The kernels' state arguments of a call: initial_state None, [N, HV, K, V] or a pool [P, HV, K, V] (with
    state_indices int [N]); step: the tokens per step of the kernel's walk (1, or its chunk), the stride of the
    kept states in steps being every // step. A pool whose rows are contiguous is read and written by the kernels
    in place (row state_indices[n] back to itself); with output_state_indices the kernel writes its final states
    to a buffer that serving.Pool.write copies (one program's row may be another's read row). A verify
    (output_intermediate_states) leaves the pool unwritten. like: a tensor on the device."""
    every = serving.every_of(output_intermediate_states, chunk_states_every)
    serving.check_every(chunk_states_every, serving.CHUNK_MULTIPLE, "triton")
    plain = HV * K * V
    pool = None if state_indices is None else serving.Pool(initial_state, state_indices, output_state_indices)
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
        sizes = serving.lengths(B, T, cu_seqlens)
    if every is not None:
        counts = sizes // every
        kept = new_states(int(counts.sum()))
        args.update(kept=kept, kept_offsets=F.pad(counts.cumsum(0), (1, 0)).to(like.device, torch.int32),
                    every=every // step)
    return StateArguments(args, pool, final, kept, every, sizes)


def gate_arguments(A_log, dt_bias, beta_logits):
    """The kernels' gating arguments: A_log, dt_bias contiguous (None when not fused), and beta's logits flag."""
    fused = A_log is not None
    return dict(A_log=A_log.contiguous() if fused else None, dt_bias=dt_bias.contiguous() if fused else None,
                BETA_LOGITS=bool(beta_logits))

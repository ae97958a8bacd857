"""The serving keywords on the Triton kernels (docs/api.md "Serving keywords"; kernellab/serving.py the pieces every
backend shares): the kernels read a pool's rows where they lie (state_indices: an int32 pointer, a row of -1 a
padding slot), write the final states back in place, store the states they keep on the way (every token for a
verify, every few chunks for a prefix cache), and compute fused gating in float32 as they load g and beta.

The arguments every state-carrying kernel takes are serving.StateArguments.kernel's (h0, h0_index, h0_stride, ht,
ht_index, ht_stride, kept, kept_offsets, every; shared with the cuda backend).
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from kernellab import serving
from kernellab.validate import LOG_DECAY_MIN

_LOG_DECAY_MIN = tl.constexpr(LOG_DECAY_MIN)
# The kernels' state arguments of a call (serving.state_arguments, shared with the cuda backend).
state_arguments = functools.partial(serving.state_arguments, backend="triton")
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


def gate_arguments(A_log, dt_bias, beta_logits):
    """The kernels' gating arguments: A_log, dt_bias contiguous (None when not fused), and beta's logits flag."""
    fused = A_log is not None
    return dict(A_log=A_log.contiguous() if fused else None, dt_bias=dt_bias.contiguous() if fused else None,
                BETA_LOGITS=bool(beta_logits))


def prepare(q, k, v, g, beta, initial_state, output_final_state, state_dtype, cu_seqlens, mode, chunk,
            state_indices=None, output_state_indices=None, output_intermediate_states=False, chunk_states_every=None,
            A_log=None, dt_bias=None, beta_logits=False):
    """The start the delta rules' entry points share: q, k, v, g, beta contiguous; the mode (a verify,
    output_intermediate_states, runs the recurrent kernel in either mode); the state arguments (kept every token in
    recurrent mode, every `chunk` tokens in chunk mode) and the gating arguments. Returns ((q, k, v, g, beta), mode,
    states, gating)."""
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    B, T, _, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    mode = "recurrent" if output_intermediate_states else mode
    states = state_arguments(initial_state, output_final_state, state_dtype, N, HV, K, V, B, T, cu_seqlens, v,
                             step=1 if mode == "recurrent" else chunk, state_indices=state_indices,
                             output_state_indices=output_state_indices,
                             output_intermediate_states=output_intermediate_states,
                             chunk_states_every=chunk_states_every)
    return (q, k, v, g, beta), mode, states, gate_arguments(A_log, dt_bias, beta_logits)

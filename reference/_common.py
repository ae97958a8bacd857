"""Slow, obviously right PyTorch for every op of API.md: token-by-token recurrences and per-expert loops.

Every function computes in float64 whatever its inputs and returns outputs in the dtype API.md names. Recurrent
states are kept in float64 and rounded to their state dtype after every step (float32 by default, float64 when the
inputs are float64, so that a float64 run of the reference is the yardstick of every parity test).
"""
import torch

from kernellab import serving
from kernellab.validate import default_state_dtype


def f64(*tensors):
    return [None if t is None else t.to(torch.float64) for t in tensors]


def stored_state_dtype(v: torch.Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the state is stored in between steps: state_dtype, or the default of v's dtype (None)."""
    return default_state_dtype(v) if state_dtype is None else state_dtype


def stored(S: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """S (float64) as stored between steps: rounded to dtype, back in float64."""
    return S if dtype == torch.float64 else S.to(dtype).to(torch.float64)


def sequences(B, T, cu_seqlens):
    """(batch row, start, end) of every sequence: the B rows, or the packed spans of cu_seqlens."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    bounds = cu_seqlens.tolist()
    return [(0, s, e) for s, e in zip(bounds, bounds[1:])]


def serve(loop, B, T, v, initial_state, output_final_state, cu_seqlens, state_dtype, state_indices,
          output_state_indices, output_intermediate_states, chunk_states_every):
    """A linear attention's call with its serving keywords (docs/api.md "Serving keywords"), the token loop being
    loop(s0, every) -> (o [B, T, H, V], finals [N, H, K, V] float64, kept [M, H, K, V] or None): s0 the initial
    states (None: zeros), every the stride at which it keeps the state after a token of a sequence (None: none),
    kept in order of sequence then position. The pool's rows are read first (differentiable) and written back
    after (without autograd). Returns (o, S) or (o, S, StateTrace)."""
    serving.check_every(chunk_states_every, serving.CHUNK_MULTIPLE, "reference")
    pool = None if state_indices is None else serving.Pool(initial_state, state_indices, output_state_indices)
    every = serving.every_of(output_intermediate_states, chunk_states_every)
    o, finals, kept = loop(initial_state if pool is None else pool.read(), every)
    return serving.finish(o, finals, kept, pool=pool, every=every, output_intermediate_states=output_intermediate_states,
                          output_final_state=output_final_state, sizes=serving.lengths(B, T, cu_seqlens),
                          state_dtype=stored_state_dtype(v, state_dtype), cu_seqlens=cu_seqlens)

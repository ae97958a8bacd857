"""Slow, obviously right PyTorch for every op of API.md: token-by-token recurrences and per-expert loops.

Every function computes in float64 whatever its inputs and returns outputs in the dtype API.md names. Recurrent
states are kept in float64 and rounded to their state dtype after every step (float32 by default, float64 when the
inputs are float64, so that a float64 run of the reference is the yardstick of every parity test).
"""
import torch

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



def kept_states(kept, every, shape, device):
    """A token loop's kept states (output_intermediate_states, chunk_states_every): the list stacked [M, *shape]
    (float64), None without a trace (every None)."""
    if not every:
        return None
    return torch.stack(kept) if kept else torch.zeros(0, *shape, dtype=torch.float64, device=device)

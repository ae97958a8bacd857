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


def token_loop(step, shape, cu_seqlens, dtype, out_dtype, device):
    """The loop(s0, every) of kernellab.serving.serve for a recurrence one token at a time: shape (B, T, H, K, V);
    step(S, b, t) -> (S_t, o_t) in float64 ([H, K, V], [H, V]) from the stored state S; the state rounded to dtype
    after every token's output, kept every `every` tokens of a sequence (every None: no trace). loop returns o
    [B, T, H, V] in out_dtype, the final states [N, H, K, V] and the kept states (kept_states)."""
    B, T, H, K, V = shape

    def loop(s0, every):
        s0 = f64(s0)[0]
        o = torch.zeros(B, T, H, V, dtype=torch.float64, device=device)
        finals, kept = [], []
        for n, (b, start, end) in enumerate(sequences(B, T, cu_seqlens)):
            S = s0[n].clone() if s0 is not None else torch.zeros(H, K, V, dtype=torch.float64, device=device)
            for t in range(start, end):
                S, o[b, t] = step(S, b, t)
                S = stored(S, dtype)  # the step's output reads the state before it is stored
                if every and (t - start + 1) % every == 0:
                    kept.append(S)
            finals.append(S)
        return o.to(out_dtype), torch.stack(finals), kept_states(kept, every, (H, K, V), device)

    return loop


def kept_states(kept, every, shape, device):
    """A token loop's kept states (output_intermediate_states, chunk_states_every): the list stacked [M, *shape]
    (float64), None without a trace (every None)."""
    if not every:
        return None
    return torch.stack(kept) if kept else torch.zeros(0, *shape, dtype=torch.float64, device=device)

import torch


def f64(*tensors):
    return [None if t is None else t.to(torch.float64) for t in tensors]


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """Recurrent states are float32, except float64 when the inputs are float64 (the yardstick)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sequences(B, T, cu_seqlens):
    """(batch row, start, end) of every sequence: the B rows, or the packed spans of cu_seqlens."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    bounds = cu_seqlens.tolist()
    return [(0, s, e) for s, e in zip(bounds, bounds[1:])]

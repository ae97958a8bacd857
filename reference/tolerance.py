"""How close to the float64 reference a backend must come: one table for the tests and the sweep's gate."""
import math

import torch

# ||out - ref|| / ||ref|| allowed, by the dtype of the backend's inputs.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 1.5e-2}
# float32 matmuls on a GPU may run in tf32 (Triton's default, cuBLAS when allowed).
TOLERANCE_TF32 = 1e-3


def tolerance(dtype: torch.dtype, device: str) -> float:
    """The allowed relative error for inputs of dtype on a device type ("cpu" or "cuda")."""
    return TOLERANCE_TF32 if dtype == torch.float32 and device == "cuda" else TOLERANCE[dtype]


# Unit roundoff of each dtype (half the distance from 1 to the next value): the relative error of one rounding.
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}


def state_tolerance(dtype: torch.dtype, device: str, state_dtype: torch.dtype, roundings: int) -> float:
    """The allowed relative error of a recurrence whose state is rounded to state_dtype `roundings` times (one per
    stored step or chunk) on inputs of dtype: the inputs' tolerance plus the random-walk growth of independent
    roundings, unit roundoff times sqrt(roundings) (decays only shrink the earlier roundings' share)."""
    return tolerance(dtype, device) + UNIT_ROUNDOFF[state_dtype] * math.sqrt(roundings)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (the plain norm of the difference when ref is zero)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())

"""Parity against the yardstick, for the sweep's rows and for the tests: one module.

How close to the float64 reference a backend must come (TOLERANCE, by dtype; tolerance() on a device; the recurrent
ops' state_tolerance() with a state stored in a narrower dtype), the relative error (rel_err), the inputs of the
float64 run (to_float64), and the check of a result against the yardstick's (compare: every output tensor, shapes,
integer outputs exact, non-finite elements; parity: compare against the op's gate). bench.sweep gates its rows
with parity(); tests/helpers.py's assert_close asserts compare()'s verdict.
"""
from __future__ import annotations

import math

import torch

from bench.ops import OPS
from kernellab.types import Permutation

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


def outputs(out) -> dict:
    """The tensors of an op's result by name (a Permutation's fields; a tuple's tensors by position, None left
    out)."""
    if isinstance(out, Permutation):
        return {"x": out.x, "offsets": out.offsets, "source": out.source}
    if isinstance(out, (tuple, list)):
        return {f"output {i}": t for i, t in enumerate(out) if t is not None}
    return {"output": out}


def compare(out, ref) -> tuple[float, str]:
    """(largest ||out - ref|| / ||ref|| over the output tensors, a problem or ""). Integer outputs must match
    exactly; a non-finite element (unwritten, or overflow) is a problem."""
    got, want = outputs(out), outputs(ref)
    worst = 0.0
    for name, expected in want.items():
        actual = got.get(name)
        if actual is None:
            return math.nan, f"{name} missing"
        if tuple(actual.shape) != tuple(expected.shape):
            return math.nan, f"{name} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
        if not expected.is_floating_point():
            if not torch.equal(actual.cpu().long(), expected.cpu().long()):
                return math.nan, f"{name} differs from the yardstick"
            continue
        if not torch.isfinite(actual.detach().double()).all():
            return math.nan, f"{name} has non-finite elements"
        worst = max(worst, rel_err(actual, expected))
    return worst, ""


def parity(op: str, out, ref, dtype, device) -> tuple[float, str]:
    """(compare's error, why the check failed or ""): compare's problem, or the error past the op's gate (the
    dtype's tolerance, at least the op's own OpSpec.tolerance)."""
    err, problem = compare(out, ref)
    gate = max(tolerance(dtype, device), OPS[op].tolerance)
    return err, problem or (f"rel_err {err:.2e} > {gate:.0e}" if err > gate else "")


def to_float64(inputs: dict) -> dict:
    """The same inputs in float64 for the yardstick run: floating tensors (a Permutation's x) in float64, float8
    tensors kept (exact as they are, and the fp8 ops' own dtype), a state_dtype among them dropped (the float64
    run keeps a float64 state)."""
    out = {}
    for key, value in inputs.items():
        if key == "state_dtype":
            continue
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.element_size() > 1:
            value = value.double()
        elif isinstance(value, Permutation):
            value = Permutation(value.x.double(), value.offsets, value.source, value.num_tokens, value.top_k)
        out[key] = value
    return out

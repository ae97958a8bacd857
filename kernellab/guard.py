"""The layout each backend receives: one input guard, applied by kernellab.registry.get to a call's checked
arguments and by kernellab.autograd to the gradients that reach a backward.

A backend declared `row_major=True` (kernellab.registry.Backend) reads its tensors through raw pointers or NumPy
views as dense row-major memory (compiled loops: numba, MKL, CUDA C++, Triton's pointer arithmetic); every tensor
it receives is then contiguous (but a pool of states, written in place: docs/api.md "Serving keywords"): a
transposed, sliced or expanded (stride 0) tensor is copied once here, a
contiguous one passes untouched (no copy, no cost beyond the stride check). Backends on torch's own ops (torch,
reference, sdpa, transformers) handle strides themselves and receive the caller's tensors as they are.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from kernellab.types import Permutation


def row_major(x):
    """x as a contiguous tensor (x itself when it already is); a Permutation with its tensors so; anything else
    unchanged. The copy is differentiable (contiguous() passes the gradient through)."""
    if isinstance(x, torch.Tensor):
        return x if x.is_contiguous() else x.contiguous()
    if isinstance(x, Permutation):
        fields = {name: row_major(getattr(x, name)) for name in ("x", "offsets", "source")}
        return x if all(fields[name] is getattr(x, name) for name in fields) else replace(x, **fields)
    return x


def layout(backend, arguments: dict) -> dict:
    """The arguments (a call's checked keywords, or a backward's incoming gradients) in the layout backend needs:
    every tensor contiguous when backend.row_major, else unchanged (the same dict)."""
    if not backend.row_major:
        return arguments
    # a pool of states (state_indices given) is written in place: it passes with its strides, never copied
    pooled = arguments.get("state_indices") is not None
    return {name: value if pooled and name == "initial_state" else row_major(value)
            for name, value in arguments.items()}

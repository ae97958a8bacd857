"""Gradients of the lab's ops: a call that needs them runs inside a torch.autograd.Function whose backward is the
same backend's backward.

`kernellab.registry.get`'s callable comes here only when grad mode is on and a floating-point argument requires
grad; every other call (torch.no_grad, inference_mode, no input requiring grad) runs the implementation directly,
exactly as without this module. `Backend.backward` (kernellab/registry.py) says how a backend differentiates:

- None: it has no backward; a call that needs a gradient raises kernellab.BackendUnavailable naming the backend
  (never a silent missing or wrong gradient).
- "autograd" (registry.AUTOGRAD): the implementation is written in differentiable torch ops and runs with grad
  mode on; torch's autograd differentiates it (the reference's float64 token loops, SDPA, softmax / top-k).
- "package.module:function": the backend's backward, by convention `<op>_backward` beside the forward in the
  same module (as fla keeps chunk.py's forward and backward side by side). The contract:

      <op>_backward(grads, **inputs, **extra) -> {input name: gradient}

  grads:  {output name: gradient or None}, one entry per differentiable output in OUTPUTS[op] (None where no
          gradient flows into that output: it was not used, or it was not returned, as the final state without
          output_final_state). Gradients have their output's shape.
  inputs: the op's checked arguments exactly as the forward received them (kernellab.validate's dict: scale a
          float, mode resolved), tensors included; extra: the call's extra keywords, which the backward takes
          under the forward's names (its signature names every keyword the forward's does, no **kwargs).
  return: a gradient for each input of DIFFERENTIABLE[op] that was given (not None): the input's shape, any
          floating dtype (cast here to the input's); None or absent only for inputs that need none. A needed
          gradient missing or misshapen is a RuntimeError naming the backend.

  The backward runs with grad mode off (no double backward: once_differentiable). It recomputes what it needs
  from the inputs: the Function saves the inputs, never the forward's intermediates, so that forward outputs
  are bitwise those of a call without gradients.

The serving keywords of the linear attentions (kernellab/serving.py) on a backend with a backward of its own:
fused gating and the read of a pool run under autograd (gradients reach a, A_log, dt_bias, the beta logits and
the pool rows read), the Function on the plain arguments; the write back into the pool and the trace carry no
gradient. A backend differentiated by AUTOGRAD (the reference) does all of it in its own differentiable code.

ids, offsets and cu_seqlens carry no gradient; nor do route's ids or a Permutation's offsets and source. A
Permutation carries its gradient in its x field: moe_permute's Function returns (x, offsets, source) and the
Permutation is rebuilt around that x, so p.x's gradient flows back to moe_permute's x.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernellab import guard, serving
from kernellab.ops import OPS
from kernellab.types import Permutation

# Backend.backward: torch's autograd through the forward as written (the registry re-exports it).
AUTOGRAD = "autograd"
# The inputs that carry a gradient, per op (API.md "Gradients"), in the order of the op's signature, and the outputs
# as the Function returns them (a tuple of tensors or None): kernellab/ops.py's records.
DIFFERENTIABLE = {name: record.differentiable for name, record in OPS.items()}
OUTPUTS = {name: record.outputs for name, record in OPS.items()}


def differentiable_outputs(op: str) -> tuple[str, ...]:
    """The names of op's outputs that carry a gradient (the keys of its backward's `grads`)."""
    return OPS[op].differentiable_outputs


def _flatten(op, out):
    """An op's result -> the tuple of the Function's outputs (OUTPUTS[op])."""
    if op == "moe_permute":
        return out.x, out.offsets, out.source
    return out if isinstance(out, tuple) else (out,)


def _rebuild(op, flat, inputs):
    """The Function's outputs -> the op's result."""
    if op == "moe_permute":
        N, top_k = inputs["ids"].shape
        return Permutation(*flat, num_tokens=N, top_k=top_k)
    return flat if len(OUTPUTS[op]) > 1 else flat[0]


def apply(backend, inputs: dict, extra: dict):
    """Run backend's implementation on inputs (kernellab.validate's checked dict) and the extra keywords, so that
    gradients reach every differentiable input that requires grad. The backend has a backward (the registry
    raises BackendUnavailable for one that has none, before coming here)."""
    op = backend.op
    if backend.backward == AUTOGRAD:
        return backend.impl(**inputs, **extra)
    if serving.requested(inputs):
        # the gating and the pool's read under autograd, the backend's Function on the plain arguments
        return serving.differentiable(lambda plain: apply(backend, plain, extra),
                                      lambda **arguments: backend.impl(**arguments, **extra), inputs)
    names = tuple(name for name in DIFFERENTIABLE[op] if inputs.get(name) is not None)
    flat = _BackendFunction.apply(backend, inputs, extra, names, *(inputs[name] for name in names))
    return _rebuild(op, flat, inputs)


class _BackendFunction(torch.autograd.Function):
    """forward: the backend's implementation (grad mode off, as in any Function); backward: its backward
    (Backend.backward), on the saved inputs. The differentiable inputs come positionally (autograd tracks
    them); `inputs` holds every argument, those included."""

    @staticmethod
    def forward(ctx, backend, inputs, extra, names, *tensors):
        op = backend.op
        flat = _flatten(op, backend.impl(**inputs, **extra))
        saved = {key: value for key, value in inputs.items() if isinstance(value, torch.Tensor)}
        ctx.save_for_backward(*saved.values())
        ctx.saved_names = tuple(saved)
        ctx.constants = {key: value for key, value in inputs.items() if key not in saved}
        ctx.backend, ctx.extra, ctx.names = backend, extra, names
        ctx.set_materialize_grads(False)  # None where no gradient flows: the backward may skip that work
        ctx.mark_non_differentiable(*(t for name, t in zip(OUTPUTS[op], flat)
                                      if name in OPS[op].constant_outputs and t is not None))
        return flat

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        backend, op = ctx.backend, ctx.backend.op
        inputs = dict(zip(ctx.saved_names, ctx.saved_tensors)) | ctx.constants
        grads = {name: grad for name, grad in zip(OUTPUTS[op], grad_outputs) if name in differentiable_outputs(op)}
        grads = guard.layout(backend, grads)  # an incoming gradient has any strides (that of a transposed state)
        found = backend.backward_impl(grads, **inputs, **ctx.extra)
        out = []
        for name, needed in zip(ctx.names, ctx.needs_input_grad[4:]):
            grad = found.get(name) if needed else None
            if needed:
                x = inputs[name]
                if not isinstance(grad, torch.Tensor) or grad.shape != x.shape:
                    got = "nothing" if grad is None else f"shape {tuple(getattr(grad, 'shape', ()))}"
                    raise RuntimeError(f"backend {backend.name!r} of {op}: its backward ({backend.backward}) gave "
                                       f"{got} for the gradient of {name}, expected shape {tuple(x.shape)}")
                grad = grad.to(x.dtype)
            out.append(grad)
        return (None, None, None, None, *out)

"""Which implementation of which op runs where.

Each toolchain package (kernellab/torch, kernellab/triton, ...) declares its backends in a list
`BACKENDS` of `Backend` records in its `__init__.py`, without importing its heavy dependencies;
the implementation module is imported the first time the backend is asked for.

A backend implementation takes the op's arguments by keyword, already checked and normalised by
`kernellab.validate` (scale a float, mode "chunk" or "recurrent"), plus the extra keywords its signature names
(no catch-all `**kwargs`): a call's other keywords are refused with a ValueError naming the backend and the
keyword, so that a misspelt option never silently times the default.

Gradients: a call in which a floating-point input requires grad (grad mode on) runs through kernellab.autograd
with the backend's `backward` (see `Backend`); every other call runs the implementation directly, as before.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from dataclasses import dataclass, replace
from functools import cache

import torch

from kernellab import autograd, guard, serving, validate
from kernellab import ops as op_records
from kernellab.autograd import AUTOGRAD
from kernellab.types import BackendUnavailable

# The op list is kernellab/ops.py's records; these are read from it.
OPS = op_records.NAMES
# The expert ops on float8_e4m3fn weights with block scales (kernellab/fp8.py), a family of their own.
FP8_OPS = op_records.family("moe_fp8")
# One file per op family: the module of each op inside reference/ and inside every toolchain package.
OP_MODULE = {name: record.family for name, record in op_records.OPS.items()}
TOOLCHAINS = ("kernellab.torch", "kernellab.mkl", "kernellab.onednn", "kernellab.triton", "kernellab.cuda",
              "kernellab.cupy", "kernellab.numba", "kernellab.numba_cuda", "kernellab.peers")
ALL_DTYPES = validate.FLOAT_DTYPES

# "auto" takes the first lab backend of this list that runs on the inputs' device. Peers never run as "auto", nor
# do mkl's MoE ops (their packed weight copies cost memory: asked for by name).
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch", "cupy", "numba_cuda", "reference"),
    "cpu": ("torch", "numba", "reference"),
}
# Ops where measurement says another order wins on a device: {(op, device type): order}. On CPU mkl's chunked
# linear attentions (one compiled loop of MKL calls, no layout copies) take about half torch's time at long
# sequences, KDA's 14x torch's forward at T = 8192 (reports/cpu); mkl falls back on torch's
# code for everything else.
AUTO_ORDER_BY_OP: dict[tuple[str, str], tuple[str, ...]] = {
    (op, "cpu"): ("mkl", "torch", "numba", "reference") for op in ("linear_attention", "gated_delta_rule", "kda")}


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    target:   "package.module:function", imported on first use.
    places:   where it runs: "cpu", "cuda" (a CUDA GPU is present), "interpret" (CPU tensors under
              TRITON_INTERPRET=1), "cudasim" (CPU tensors under NUMBA_ENABLE_CUDASIM=1).
    requires: modules that must be importable.
    dtypes:   input dtypes it accepts (others are a ValueError naming the backend).
    peer:     code written elsewhere (fla, transformers, ...), measured beside ours, never "auto".
    probe:    "module:function" returning why it cannot run here (None when it can), for needs that no
              importable module names (a library inside torch's build).
    deterministic:   repeated calls on the same inputs give bitwise equal outputs.
    batch_invariant: one sequence's (or token's) output is bitwise the same whatever else shares its batch or
              its packed row; where it is not, the output still agrees within the dtype's tolerance.
    variance_note:   why, where either of the two is False (tests/ops/test_invariance.py and the report print it).
    row_major: its code reads tensors as dense row-major memory (compiled loops through pointers or NumPy views):
              kernellab.guard gives it every tensor argument, and its backward every incoming gradient,
              contiguous. False: torch ops that handle any strides (the caller's tensors pass as they are).
    serving:  the serving keywords of the linear attentions it implements (kernellab/serving.py: state_indices,
              output_state_indices, output_intermediate_states, chunk_states_every, A_log, dt_bias,
              beta_logits): its implementation takes them by keyword when a call sets them (never otherwise: a
              call without them reaches it as before); a call setting another is a ValueError naming the
              keyword and the backend, and "auto" takes the first backend of its order that declares them all.
    backward: how the gradients of a call that needs them are computed (kernellab/autograd.py states the contract):
              None, no backward: such a call raises BackendUnavailable; AUTOGRAD ("autograd"): torch's autograd
              through the implementation as written (differentiable torch ops: the reference, SDPA);
              "package.module:function": the backend's own backward, by convention `<op>_backward` beside the
              forward in the same module (`family_backends(..., backward={op: BESIDE})`).
    """

    op: str
    name: str
    target: str
    places: tuple[str, ...]
    requires: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES
    peer: bool = False
    probe: str | None = None
    deterministic: bool = True
    batch_invariant: bool = True
    variance_note: str = ""
    backward: str | None = None
    row_major: bool = False
    serving: frozenset[str] = frozenset()

    def devices(self) -> tuple[str, ...]:
        """Device types ("cpu", "cuda") of the tensors this backend runs on, on this machine now."""
        found = []
        for place in self.places:
            if place == "cuda" and _cuda_available():
                found.append("cuda")
            elif place == "cpu" or (place == "interpret" and os.environ.get("TRITON_INTERPRET") == "1") or (
                    place == "cudasim" and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"):
                found.append("cpu")
        return tuple(dict.fromkeys(found))

    def unavailable_reason(self) -> str | None:
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"backend {self.name!r} of {self.op} needs the package(s) {', '.join(missing)}, not installed"
        if self.probe and (reason := resolve(self.probe)()):
            return f"backend {self.name!r} of {self.op}: {reason}"
        if not self.devices():
            return (f"backend {self.name!r} of {self.op} runs on {' or '.join(self.places)}, none of which is "
                    f"here (no CUDA GPU; TRITON_INTERPRET / NUMBA_ENABLE_CUDASIM not set)")
        return None

    @property
    def impl(self):
        return resolve(self.target)

    @property
    def backward_impl(self):
        """The function of a backward named "module:function" (not None, not AUTOGRAD)."""
        return resolve(self.backward)


def resolve(target: str):
    """The object named by "package.module:attribute"."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


BESIDE = "beside"  # family_backends' backward={op: BESIDE}: <op>_backward in the forward's module


def family_backends(package: str, name: str, places: tuple[str, ...], ops: tuple[str, ...],
                    backward: dict | None = None, **options) -> list[Backend]:
    """Backend `name` of every op in ops, each implemented at package.<OP_MODULE[op]>:<op>. backward: {op: BESIDE,
    AUTOGRAD or "module:function"} for the ops that have one (BESIDE: package.<OP_MODULE[op]>:<op>_backward)."""
    backward = backward or {}
    _check_ops(package, ops)
    unknown = set(backward) - set(ops)
    if unknown:
        raise ValueError(f"{package}: backward declared for op(s) {sorted(unknown)} not in ops")

    def backward_of(op):
        how = backward.get(op)
        return f"{package}.{OP_MODULE[op]}:{op}_backward" if how == BESIDE else how

    return [Backend(op, name, f"{package}.{OP_MODULE[op]}:{op}", places, backward=backward_of(op), **options)
            for op in ops]


def _check_ops(package: str, ops) -> None:
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"{package}: ops {unknown} are not ops of kernellab/ops.py")


def batch_variant(backends: list[Backend], notes: dict[str, str]) -> list[Backend]:
    """backends, with those of the ops in notes declared not batch invariant and notes[op] their variance_note."""
    return [replace(b, batch_invariant=False, variance_note=notes[b.op]) if b.op in notes else b for b in backends]


def _cuda_available() -> bool:
    return torch.cuda.is_available()


@cache
def _table() -> dict[str, dict[str, Backend]]:
    table: dict[str, dict[str, Backend]] = {op: {} for op in OPS}
    for backend in _reference_backends():
        table[backend.op][backend.name] = backend
    for package in TOOLCHAINS:
        for backend in importlib.import_module(package).BACKENDS:
            if backend.op not in table:
                raise RuntimeError(f"{package} registers unknown op {backend.op!r}")
            if backend.name in table[backend.op]:
                raise RuntimeError(f"{package} registers {backend.op}/{backend.name} twice")
            table[backend.op][backend.name] = backend
    return table


def _reference_backends():
    # its gradients: torch's autograd through the float64 token loops, the yardstick of every backward
    found = family_backends("reference", "reference", ("cpu", "cuda"), OPS, backward={op: AUTOGRAD for op in OPS})
    return [replace(b, serving=serving.KEYWORDS) if b.op in serving.OPS else b for b in found]


def _check_op(op):
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")


def registered(op: str) -> dict[str, Backend]:
    """Every backend of op, whether or not it runs here."""
    _check_op(op)
    return dict(_table()[op])


def backends(op: str, device: str | torch.device | None = None) -> list[str]:
    """Names of op's backends that run on this machine (on tensors of `device` when given)."""
    _check_op(op)
    kind = None if device is None else torch.device(device).type
    return [name for name, b in _table()[op].items()
            if b.unavailable_reason() is None and (kind is None or kind in b.devices())]


def auto_backend(op: str, device: str | torch.device, dtype: torch.dtype | None = None, grad: bool = False) -> str:
    """The name "auto" resolves to for op on tensors of `device` (and `dtype`, when given: the first backend of
    the order that takes it; `grad`: the first that has a backward, for calls that need gradients). Resolved once
    per (op, device type, dtype, grad) and cached: `reset()` forgets."""
    _check_op(op)
    return _auto(op, torch.device(device).type, dtype, grad)


@cache
def _auto(op: str, kind: str, dtype: torch.dtype | None, grad: bool = False,
          keywords: frozenset[str] = frozenset()) -> str:
    """keywords: the serving keywords the call sets (the backend must declare them all)."""
    runnable = set(backends(op, kind))
    table = _table()[op]
    order = AUTO_ORDER_BY_OP.get((op, kind), AUTO_ORDER.get(kind, ("reference",)))
    for name in order:
        if name in runnable and (dtype is None or dtype in table[name].dtypes) and (
                not grad or table[name].backward is not None) and keywords <= table[name].serving:
            return name
    raise BackendUnavailable(f"no backend of {op}{' with a backward' if grad else ''}"
                             f"{f' taking {sorted(keywords)}' if keywords else ''} runs on {kind} tensors"
                             f"{'' if dtype is None else f' of {dtype}'} here")


def check_serving(backend: Backend, keywords) -> None:
    """ValueError naming the keyword and the backend when a call sets a serving keyword the backend lacks."""
    missing = [name for name in keywords if name not in backend.serving]
    if missing:
        able = [name for name, b in registered(backend.op).items() if missing[0] in b.serving]
        raise ValueError(f"{missing[0]}: backend {backend.name!r} of {backend.op} does not implement this serving "
                         f"keyword{f' (nor {missing[1:]})' if len(missing) > 1 else ''}; backends that do: "
                         f"{', '.join(able) or 'none'}")


def reset() -> None:
    """Forget the cached table, "auto" choices and signatures (after the environment changed, e.g. in tests)."""
    for cached in (_table, _auto, _extra_keywords):
        cached.cache_clear()


@cache
def _api_keywords(op: str) -> frozenset[str]:
    """The keywords of op's public signature (kernellab.validate's function), which every backend receives."""
    return frozenset(inspect.signature(getattr(validate, op)).parameters)


@cache
def _extra_keywords(backend: Backend) -> frozenset[str]:
    """The keywords backend's implementation takes beyond the op's public ones, read once from its signature."""
    parameters = inspect.signature(backend.impl).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        raise TypeError(f"backend {backend.name!r} of {backend.op} ({backend.target}) takes **kwargs: its extra "
                        f"keywords must be named in its signature")
    return frozenset(parameters) - _api_keywords(backend.op)


def check_keywords(backend: Backend, keywords) -> None:
    """ValueError naming the backend and the keyword when a call passes a keyword its implementation lacks."""
    unknown = sorted(set(keywords) - _extra_keywords(backend))
    if unknown:
        allowed = sorted(_extra_keywords(backend))
        raise ValueError(f"backend {backend.name!r} of {backend.op} takes no keyword {unknown[0]!r}"
                         f"{f' (nor {unknown[1:]})' if len(unknown) > 1 else ''}; its extra keywords: "
                         f"{', '.join(allowed) or 'none'}")


def requires_grad(checked: dict) -> bool:
    """Whether a tensor among a call's checked arguments requires grad (only floating-point tensors can). A plain
    loop: about 40% cheaper than any() over a generator, on every call made with grad mode on."""
    for x in checked.values():
        if isinstance(x, torch.Tensor) and x.requires_grad:
            return True
    return False


def no_backward(backend: Backend, checked: dict) -> BackendUnavailable:
    """The error of a call that needs gradients from a backend without a backward: which inputs require grad, and
    the backends of the op that have one."""
    op = backend.op
    wanted = [name for name in op_records.OPS[op].differentiable if isinstance(checked.get(name), torch.Tensor)
              and checked[name].requires_grad]
    able = [name for name, b in registered(op).items() if b.backward is not None]
    return BackendUnavailable(
        f"backend {backend.name!r} of {op} has no backward, and {', '.join(wanted)} "
        f"{'requires' if len(wanted) == 1 else 'require'} grad; backends "
        f"of {op} with a backward: {', '.join(able) or 'none'} (for inference, call it under torch.no_grad() "
        f"or torch.inference_mode())")


def _lookup(op: str, name: str) -> Backend:
    table = _table()[op]
    if name not in table:
        raise BackendUnavailable(f"{op} has no backend {name!r}; registered: {', '.join(table)}")
    reason = table[name].unavailable_reason()
    if reason:
        raise BackendUnavailable(reason)
    return table[name]


def get(op: str, name: str = "auto"):
    """The callable for op's backend `name` (or "auto"), with the op's public signature minus `backend`.

    It checks its inputs (ValueError naming the argument) and its extra keywords against the implementation's
    signature, then runs the implementation; when a floating-point input requires grad and grad mode is on, inside
    kernellab.autograd's Function with the backend's backward ("auto" then takes the first backend that has one).
    Under torch.no_grad / inference_mode, or with no input requiring grad, the call is the implementation's."""
    _check_op(op)
    fixed = None if name == "auto" else _lookup(op, name)
    check = getattr(validate, op)
    api_names = _api_keywords(op)

    def call(*args, **kwargs):
        api = {key: kwargs.pop(key) for key in list(kwargs) if key in api_names}
        checked = check(*args, **api)
        tensor = next(iter(checked.values()))  # every op's first argument is a tensor
        grad = torch.is_grad_enabled() and requires_grad(checked)
        keywords = frozenset(serving.requested(checked))
        backend = fixed or _lookup(op, _auto(op, tensor.device.type, tensor.dtype, grad, keywords))
        if keywords:
            check_serving(backend, keywords)
        if tensor.device.type not in backend.devices():
            raise BackendUnavailable(f"backend {backend.name!r} of {op} does not run on {tensor.device.type} "
                                     f"tensors here (runs on: {', '.join(backend.devices()) or 'nothing here'})")
        if tensor.dtype not in backend.dtypes:
            raise ValueError(f"backend {backend.name!r} of {op} does not take {tensor.dtype} inputs")
        if kwargs:
            check_keywords(backend, kwargs)
        checked = guard.layout(backend, checked)  # the layout the backend reads (a copy only where it differs)
        if grad:
            if backend.backward is None:
                raise no_backward(backend, checked)
            return autograd.apply(backend, checked, kwargs)
        return backend.impl(**checked, **kwargs)

    call.__name__ = f"{op}[{name}]"
    call.__doc__ = f"{op} through backend {name!r}; see kernellab.{op}."
    return call

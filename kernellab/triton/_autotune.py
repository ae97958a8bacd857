"""Config selection and launch flags shared by the Triton kernels.

On a GPU, `autotune` is `triton.autotune` keyed on head dims only (never on T, so one tuning serves every
sequence length). Under TRITON_INTERPRET=1 there is nothing to time: the first config that `prune` keeps
is launched directly. Flags that follow from the arguments (IS_VARLEN when cu_seqlens is given, ...) are
computed at launch by `@triton.heuristics({"IS_VARLEN": given("cu_seqlens"), ...})` above the autotuner, so
that its key sees them. Under the interpreter of Triton before 3.9, scalar tensors become Python indices as
3.9 makes them (see `_squeeze_scalar_indices`).
"""
import os

import torch
import triton
from triton.runtime import KernelInterface

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dot_precision(dtype):
    """tl.dot input precision: exact ("ieee") for float32 inputs, whose users expect float32 accuracy;
    fp16 / bf16 operands are exact in tf32 anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def given(name):
    """A triton.heuristics value: True when the launch passes a tensor (not None) for argument `name`."""
    return lambda args: args[name] is not None


class _FirstConfig(KernelInterface):
    """Stands in for triton.autotune under the interpreter: a launch runs the first config that prune keeps.
    Like triton's Autotuner it keeps the kernel in `.fn` and its argument names, so triton.heuristics can wrap it."""

    def __init__(self, fn, configs, prune):
        self.fn, self.configs, self.prune, self.arg_names = fn, configs, prune, fn.arg_names

    def run(self, *args, **kwargs):
        configs = (self.prune(self.configs, dict(zip(self.arg_names, args)), **kwargs) if self.prune
                   else self.configs)
        config = configs[0]
        return self.fn.run(*args, **kwargs, **config.kwargs, num_warps=config.num_warps,
                           num_stages=config.num_stages)


def _squeeze_scalar_indices():
    """Triton's interpreter before 3.9 (3.6 checked) turns a scalar tensor into a Python index with int() of its
    one-element array, which NumPy 2.4 refuses (only 0-d arrays convert); 3.9 squeezes the array first. Loops
    bounded by program-id arithmetic (range(first, last, BLOCK_S)) need it, so the older interpreter gets 3.9's
    conversion, set in the scope the interpreter patches triton.language with for each launch (interpreters
    without such a scope are left as they are)."""
    from triton.runtime import interpreter

    if not hasattr(interpreter, "_LangPatchScope"):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_squeezed(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_squeezed


if INTERPRET and tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9):
    _squeeze_scalar_indices()


def autotune(configs, key, prune=None):
    """Decorator: triton.autotune(configs, key) on a GPU, the first config kept by prune under the interpreter.

    prune(configs, named_args, **kwargs) -> the configs valid for this launch (e.g. a state tile that fits
    the register file for this K). Launch with keyword arguments only."""
    def wrap(fn):
        if INTERPRET:
            return _FirstConfig(fn, configs, prune)
        return triton.autotune(configs, key=key,
                               prune_configs_by={"early_config_prune": prune} if prune else None)(fn)
    return wrap

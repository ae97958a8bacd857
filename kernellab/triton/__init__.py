"""Triton backends: CUDA GPUs, or CPU tensors under TRITON_INTERPRET=1.

Each kernel module also lists `AOT_SPECS`: its kernels at production configurations, which
`profiling.static` compiles ahead of time for sm_90 (no GPU needed) to report registers, spills and
shared memory. `aot_spec` builds one from the kernel's own parameter list.
"""
import inspect
from dataclasses import dataclass, field

import torch

from kernellab.registry import Backend, batch_variant
from kernellab.serving import KEYWORDS


@dataclass(frozen=True)
class AotSpec:
    """One @triton.jit kernel at one configuration, for triton.compile(ASTSource(...), target=sm_90).

    name:       a label for the table, e.g. "gated_delta_rule.chunk_state[K=128,V=128,HV=32,HK=16,bf16,BV=16]".
    kernel:     "package.module:attr" of the kernel (the @triton.jit function or its autotune / heuristics
                wrapper: `jit_function` unwraps it).
    signature:  argument name -> Triton type ("*bf16", "*fp32", "i32", "fp32", "constexpr").
    constexprs: values of the constexpr arguments.
    divisible_by_16: integer arguments that are multiples of 16 at this configuration (Triton specialises such
                values at launch; without the hint the AOT build is not the code that runs).
    """

    name: str
    kernel: str
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple = ()


def jit_function(kernel):
    """The object @triton.jit made (a JITFunction; an InterpretedFunction under TRITON_INTERPRET=1) behind
    triton.autotune / triton.heuristics wrappers (and _autotune's interpreter stand-in), which each keep the
    wrapped kernel in `.fn`; the @triton.jit object's own `.fn` is the Python function."""
    while not inspect.isfunction(kernel.fn):
        kernel = kernel.fn
    return kernel


def aot_spec(name, kernel, constexprs, pointers, floats=(), divisible_by_16=(), num_warps=4, num_stages=3):
    """The AotSpec of `kernel` (a @triton.jit function, or its autotune / heuristics wrapper) at one configuration,
    its signature read from the kernel's parameters (names and which are tl.constexpr, as Triton reads them).

    constexprs: a value for every tl.constexpr parameter (the flags its @triton.heuristics compute at launch
                among them), and for any other argument to compile as a constant (a unit stride: Triton
                specialises an integer equal to 1 at launch).
    pointers:   the element type ("bf16", "fp32", "i32", "i64") of every pointer argument.
    floats:     the float scalar arguments (fp32). Every other argument is an i32 scalar.
    divisible_by_16: integer arguments that are multiples of 16 at this configuration.
    """
    from triton.runtime import JITFunction

    jitted = jit_function(kernel)
    python_fn = jitted.fn
    # Triton's own reading of the parameters; under the interpreter triton.jit gave an InterpretedFunction,
    # which has no such list, so a JITFunction is made for the reading only.
    params = (jitted if isinstance(jitted, JITFunction) else JITFunction(python_fn)).params
    names = [p.name for p in params]
    unknown = sorted((set(constexprs) | set(pointers) | set(floats) | set(divisible_by_16)) - set(names))
    if unknown:
        raise ValueError(f"AotSpec {name}: {', '.join(unknown)} not among the arguments of {python_fn.__name__}")
    missing = [p.name for p in params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"AotSpec {name}: constexprs lacks a value for {', '.join(missing)}")
    constant_pointers = sorted(set(constexprs) & set(pointers))
    if constant_pointers:
        raise ValueError(f"AotSpec {name}: {', '.join(constant_pointers)} given both as pointer and constexpr")
    signature = {n: "constexpr" if n in constexprs else f"*{pointers[n]}" if n in pointers
                 else "fp32" if n in floats else "i32" for n in names}
    return AotSpec(name, f"{python_fn.__module__}:{python_fn.__name__}", signature,
                   {n: constexprs[n] for n in names if n in constexprs}, num_warps, num_stages,
                   tuple(divisible_by_16))


_TRITON = dict(places=("cuda", "interpret"), requires=("triton",), row_major=True,
               dtypes=(torch.float32, torch.float16, torch.bfloat16))
BACKENDS = [
    Backend("linear_attention", "triton", "kernellab.triton.linear_attention:linear_attention",
            backward="kernellab.triton.linear_attention:linear_attention_backward",
            serving=KEYWORDS - {"output_intermediate_states", "beta_logits"}, **_TRITON),  # no token-by-token kernel
    Backend("gated_delta_rule", "triton", "kernellab.triton.gated_delta_rule:gated_delta_rule",
            backward="kernellab.triton.gated_delta_rule:gated_delta_rule_backward", serving=KEYWORDS, **_TRITON),
    Backend("kda", "triton", "kernellab.triton.kda:kda", backward="kernellab.triton.kda:kda_backward",
            serving=KEYWORDS, **_TRITON),
    Backend("attention", "triton", "kernellab.triton.attention:attention", **_TRITON),
    Backend("route", "triton", "kernellab.triton.route:route", **_TRITON),
    Backend("moe_permute", "triton", "kernellab.triton.moe_permute:moe_permute",
            backward="kernellab.triton.moe_permute:moe_permute_backward", **_TRITON),
    Backend("moe_unpermute", "triton", "kernellab.triton.moe_permute:moe_unpermute",
            backward="kernellab.triton.moe_permute:moe_unpermute_backward", **_TRITON),
    Backend("grouped_gemm", "triton", "kernellab.triton.grouped_gemm:grouped_gemm",
            backward="kernellab.triton.grouped_gemm:grouped_gemm_backward", **_TRITON),
    Backend("moe", "triton", "kernellab.triton.moe:moe", backward="kernellab.triton.moe:moe_backward", **_TRITON),
    Backend("grouped_gemm_fp8", "triton", "kernellab.triton.moe_fp8:grouped_gemm_fp8", **_TRITON),
    Backend("moe_fp8", "triton", "kernellab.triton.moe_fp8:moe_fp8", **_TRITON),
]

# Batch invariance, measured under TRITON_INTERPRET=1 by tests/ops/test_invariance.py.
BACKENDS = batch_variant(BACKENDS, {
    "moe": "under TRITON_INTERPRET=1 the tile products are NumPy matmuls, which round a row by its position in the "
           "tile, and a token alone sits in another row of its expert's block than in a batch; on a GPU (not "
           "measured) the decode (N <= 64, BLOCK_M 16) and prefill paths also take different tiles (GEMM_CONFIGS)",
    "moe_fp8": "as moe: under TRITON_INTERPRET=1 a token's row of its expert's block rounds by its position in the "
               "tile; on a GPU (not measured) decode (16-row) and prefill (64/128-row) tiles differ",
})

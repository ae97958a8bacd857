"""The lab's ops: one record each, the only op list. The registry (the ops it knows, the module of each op inside
reference/ and every toolchain), kernellab.autograd (what carries a gradient), kernellab/__init__ and the tests
read it; bench/ops/<family>.py holds the bench's knowledge of each family. Adding an op starts here.

Imports nothing of the lab: every other module may read it (reference/ included).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Op:
    """One op of docs/api.md.

    name:           the API name (kernellab.<name>, kernellab.validate.<name>, the CSV's op column).
    family:         the module that implements it inside reference/ and inside each toolchain package (one file
                    per op family: "moe" holds route, the permutations, grouped_gemm and the layer).
    differentiable: the inputs that carry a gradient, in the order of the op's signature (docs/api.md
                    "Gradients"); a backward returns one gradient for each of them that was given.
    outputs:        the outputs in the order the op returns them (a Permutation's fields for moe_permute); those
                    not in `constant_outputs` carry a gradient (the keys of a backward's `grads`).
    constant_outputs: outputs that carry no gradient (ids, offsets, source).
    """

    name: str
    family: str
    differentiable: tuple[str, ...]
    outputs: tuple[str, ...]
    constant_outputs: tuple[str, ...] = ()

    @property
    def differentiable_outputs(self) -> tuple[str, ...]:
        return tuple(name for name in self.outputs if name not in self.constant_outputs)


# In report order (bench's tables and the report's sections follow it).
RECORDS = (
    Op("gated_delta_rule", "gated_delta_rule", ("q", "k", "v", "g", "beta", "initial_state"), ("o", "final_state")),
    Op("kda", "kda", ("q", "k", "v", "g", "beta", "initial_state"), ("o", "final_state")),
    Op("linear_attention", "linear_attention", ("q", "k", "v", "g", "initial_state"), ("o", "final_state")),
    Op("attention", "attention", ("q", "k", "v"), ("o",)),
    Op("route", "moe", ("router_logits",), ("weights", "ids"), constant_outputs=("ids",)),
    Op("moe_permute", "moe", ("x",), ("x", "offsets", "source"), constant_outputs=("offsets", "source")),
    Op("moe_unpermute", "moe", ("y_sorted", "weights"), ("y",)),
    Op("grouped_gemm", "moe", ("x", "w"), ("y",)),
    Op("moe", "moe", ("x", "weights", "w_gate_up", "w_down"), ("y",)),
    # The expert ops on float8_e4m3fn weights with block scales (kernellab/fp8.py). No backend has a backward: a
    # call that needs one says so (BackendUnavailable).
    Op("grouped_gemm_fp8", "moe_fp8", ("x",), ("y",)),
    Op("moe_fp8", "moe_fp8", ("x", "weights"), ("y",)),
)
OPS: dict[str, Op] = {record.name: record for record in RECORDS}
NAMES: tuple[str, ...] = tuple(OPS)


def family(name: str) -> tuple[str, ...]:
    """The names of the ops of one family (the ops whose family is `name`), in record order."""
    return tuple(record.name for record in RECORDS if record.family == name)

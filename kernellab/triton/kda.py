"""Kimi Delta Attention in Triton: the gated delta rule's recurrent kernel (kernellab/triton/gated_delta_rule.py,
KEY_GATE: row d of the state decays by exp(g_t[d])), one program per (sequence, value head, V tile) walking its
tokens with its state slice in registers. It runs both modes: the chunked kernels with the per-channel decays
inside the chunk's products (fla's chunk_kda) are not written yet, so prefill runs token by token too."""
import torch
import triton

from kernellab.triton import aot_spec
from kernellab.triton._autotune import TRITON_DTYPE
from kernellab.triton.gated_delta_rule import _recurrent_gated_delta_rule, recurrent_kernel
from kernellab.validate import STATE_ROUNDING


def kda(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, mode, state_dtype):
    """q, k [B, T, HK, K]; v [B, T, HV, V]; g [B, T, HV, K]; beta [B, T, HV]; initial_state None or [N, HV, K, V]
    (in state_dtype when given); cu_seqlens None or int [N + 1] (B = 1); mode "chunk" or "recurrent" (the same
    token loop). Returns (o [B, T, HV, V] in v's dtype, final state [N, HV, K, V] in state_dtype or None). The
    state is rounded to state_dtype after every token; the arithmetic is float32."""
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    h0 = None if initial_state is None else initial_state.to(state_dtype).contiguous()
    return _recurrent_gated_delta_rule(q, k, v, g, beta, scale, h0, output_final_state, use_qk_l2norm, cu_seqlens,
                                       state_dtype)


def _aot_specs(HV, HK, K, V, dtype):
    dt = TRITON_DTYPE[dtype]
    return [aot_spec(f"kda.recurrent[K={K},V={V},HV={HV},HK={HK},{dt},BV=32{state_label}]", recurrent_kernel,
                     dict(HV=HV, HK=HK, K=K, V=V, BK=triton.next_power_of_2(K), BV=32, USE_INITIAL_STATE=True,
                          STORE_FINAL_STATE=True, USE_QK_L2NORM=True, IS_VARLEN=True,
                          STATE_ROUNDING=STATE_ROUNDING[state_dtype], KEY_GATE=True),
                     pointers=dict(q=dt, k=dt, v=dt, g="fp32", beta="fp32", o=dt, h0=TRITON_DTYPE[state_dtype],
                                   ht=TRITON_DTYPE[state_dtype], cu_seqlens="i32"),
                     floats=("scale",))
            for state_dtype, state_label in ((torch.float32, ""), (torch.bfloat16, ",state=bf16"))]


# Kimi Linear (48B-A3B: 32 heads, Hk = Hv, K = V = 128) and FlashKDA's benchmark heads (96), bf16.
AOT_SPECS = _aot_specs(32, 32, 128, 128, torch.bfloat16) + _aot_specs(96, 96, 128, 128, torch.bfloat16)

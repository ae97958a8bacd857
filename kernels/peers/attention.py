"""Quadratic attention baselines: torch's SDPA and flash-attn's flash_attn_func, on the lab's API
(q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D]; bottom-right causal mask when Tk > Tq)."""
from kernels.torch.attention import attention as sdpa_attention  # the one SDPA call, shared with the torch backend

__all__ = ["sdpa_attention", "flash_attn_attention"]


def flash_attn_attention(q, k, v, causal, scale):
    """flash-attn's flash_attn_func (GPU; registered for fp16 and bf16 only). It takes BTHD and grouped KV heads,
    and aligns the causal mask bottom-right when Tk > Tq, as the lab's API does. Returns [B, Tq, Hq, D]."""
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)

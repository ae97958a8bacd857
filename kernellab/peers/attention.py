"""Quadratic attention baselines: torch's SDPA and flash-attn's functions, on the lab's API
(q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D]; bottom-right causal mask when Tk > Tq; packed sequences by cu_seqlens;
KV buffers with per-sequence lengths kv_lens)."""
import torch

from kernellab.torch.attention import attention as sdpa_attention  # the one SDPA call, shared with the torch backend

__all__ = ["sdpa_attention", "flash_attn_attention"]


def flash_attn_attention(q, k, v, causal, scale, cu_seqlens, kv_lens):
    """flash-attn (GPU; registered for fp16 and bf16 only). It takes BTHD and grouped KV heads, and aligns the
    causal mask bottom-right when Tk > Tq, as the lab's API does. cu_seqlens: flash_attn_varlen_func on the packed
    tokens [T, H, D] (the same offsets for queries and keys); kv_lens: flash_attn_with_kvcache, whose
    cache_seqlens are the valid lengths of the buffers. Returns [B, Tq, Hq, D]."""
    import flash_attn

    if cu_seqlens is not None:
        cu = cu_seqlens.to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        o = flash_attn.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, longest, longest, softmax_scale=scale,
                                              causal=causal)
        return o[None]
    if kv_lens is not None:
        return flash_attn.flash_attn_with_kvcache(q, k, v, cache_seqlens=kv_lens.to(torch.int32),
                                                  softmax_scale=scale, causal=causal)
    return flash_attn.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)

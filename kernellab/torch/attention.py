"""Softmax attention through torch.nn.functional.scaled_dot_product_attention (CPU and GPU).

The same function is the `sdpa` peer (kernellab/peers/attention.py), the baseline the lab's linear attention is
measured against: SDPA is already torch's best attention, so the lab's torch backend is that call, with the
layout, grouped KV heads, the bottom-right causal mask of a KV cache, packed sequences and KV buffers of
per-sequence lengths handled here.
"""
import torch
import torch.nn.functional as F


def _sdpa(q, k, v, causal, scale, mask=None):
    """q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D]; mask None or bool [B or 1, 1, Tq, Tk] (True = visible)."""
    Tq, Tk = q.shape[1], k.shape[1]
    if mask is None and causal and Tk != Tq:
        # SDPA's is_causal aligns the mask top-left; a KV cache needs it bottom-right.
        query_pos = torch.arange(Tk - Tq, Tk, device=q.device)
        mask = torch.arange(Tk, device=q.device)[None, :] <= query_pos[:, None]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=mask is None and causal, scale=scale,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def attention(q, k, v, causal, scale, cu_seqlens, kv_lens):
    """q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D] with Hq % Hkv == 0 and Tk >= Tq (query i sits at key Tk - Tq + i).
    cu_seqlens [N + 1] (B = 1): one SDPA call per packed sequence (its causal fast path; a block-diagonal mask
    would cost T^2). kv_lens [B]: one call over the whole buffer with a mask built on the device (no host read,
    so a decode step can be captured in a CUDA graph); the buffer past kv_lens must be finite (masked scores
    still multiply it: a zero-initialised cache is). Returns [B, Tq, Hq, D] in v's dtype, contiguous."""
    if cu_seqlens is not None:
        o = torch.empty_like(q, dtype=v.dtype)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds, bounds[1:]):
            if end > start:
                o[:, start:end] = _sdpa(q[:, start:end], k[:, start:end], v[:, start:end], causal, scale)
        return o
    if kv_lens is not None:
        Tq, Tk = q.shape[1], k.shape[1]
        keys = torch.arange(Tk, device=q.device)
        last = kv_lens[:, None, None, None]  # [B, 1, 1, 1]: one past the last valid key of each sequence
        mask = keys < last
        if causal:  # query i sees keys up to kv_lens - Tq + i
            mask = mask & (keys <= last - Tq + torch.arange(Tq, device=q.device)[:, None])
        return _sdpa(q, k, v, causal, scale, mask).contiguous()
    return _sdpa(q, k, v, causal, scale).contiguous()

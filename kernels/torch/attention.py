"""Softmax attention through torch.nn.functional.scaled_dot_product_attention (CPU and GPU).

The same function is the `sdpa` peer (kernels/peers/attention.py), the baseline the lab's linear attention is
measured against: SDPA is already torch's best attention, so the lab's torch backend is that call, with the
layout, grouped KV heads and the bottom-right causal mask of a KV cache handled here.
"""
import torch
import torch.nn.functional as F


def attention(q, k, v, causal, scale):
    """q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D] with Hq % Hkv == 0 and Tk >= Tq (query i sits at key Tk - Tq + i).
    Returns [B, Tq, Hq, D] in v's dtype, contiguous."""
    Tq, Tk = q.shape[1], k.shape[1]
    mask = None
    if causal and Tk != Tq:
        # SDPA's is_causal aligns the mask top-left; a KV cache needs it bottom-right.
        query_pos = torch.arange(Tk - Tq, Tk, device=q.device)
        mask = torch.arange(Tk, device=q.device)[None, :] <= query_pos[:, None]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=causal and Tk == Tq, scale=scale,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2).contiguous()

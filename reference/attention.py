"""Softmax attention written out: scores, mask, softmax, weighted sum."""
import torch


def attention(q, k, v, causal=True, scale=None):
    """q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D], Hq % Hkv == 0, Tk >= Tq (query i sits at key Tk - Tq + i).

    o_t = softmax(scale q_t K^T + causal mask) V. Returns [B, Tq, Hq, D] in v's dtype."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    kv_head = torch.arange(Hq, device=q.device) // (Hq // Hkv)
    qq, kk, vv = (t.to(torch.float64) for t in (q, k[:, :, kv_head], v[:, :, kv_head]))
    scores = scale * torch.einsum("bqhd,bkhd->bhqk", qq, kk)
    if causal:
        query_pos = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
        scores = scores.masked_fill(torch.arange(Tk, device=q.device)[None, :] > query_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, vv).to(v.dtype)

"""Softmax attention written out: scores, mask, softmax, weighted sum; packed sequences and KV buffers one
sequence at a time."""
import torch


def attention(q, k, v, causal=True, scale=None, cu_seqlens=None, kv_lens=None):
    """q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D], Hq % Hkv == 0, Tk >= Tq (query i sits at key Tk - Tq + i).
    cu_seqlens int [N + 1] (B = 1, Tk = Tq): N packed sequences, each attending within itself. kv_lens int [B]:
    only the first kv_lens[b] keys of sequence b exist (query i at key kv_lens[b] - Tq + i).

    o_t = softmax(scale q_t K^T + causal mask) V. Returns [B, Tq, Hq, D] in v's dtype."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        o = torch.empty_like(q, dtype=v.dtype)
        for start, end in zip(bounds, bounds[1:]):
            o[:, start:end] = attention(q[:, start:end], k[:, start:end], v[:, start:end], causal, scale)
        return o
    if kv_lens is not None:
        return torch.cat([attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal, scale)
                          for b, n in enumerate(kv_lens.tolist())])
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

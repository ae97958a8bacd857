"""Scalar-gated linear attention, chunked: torch computes the intra-chunk parts in float32 and the CUDA kernel
gdr_chunk_state (kernellab/cuda/gated_delta_rule.cu, without its delta-rule term) carries the state across chunks:
    [kernel] h_c = S;  S = e^{G_last} S + (e^{G_last - G} k)^T v
    o = scale (e^G q h_c + tril(q k^T e^{G_i - G_j}) v),
G the cumulative log decay inside each chunk. Packed sequences are padded to whole chunks (padding has
k = v = g = 0, which leaves the state alone)."""
import torch

from kernellab.cuda.gated_delta_rule import CHUNK, _token_index, chunk_state_pass


def linear_attention(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, mode, state_dtype,
                     state_pass=chunk_state_pass):
    """q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] or None; initial_state [N, H, K, V] in state_dtype or None
    (K <= 128). Returns o [B, T, H, V] in v's dtype and the final state [N, H, K, V] in state_dtype (or None). Both
    modes run the chunked algorithm (the same function), the state rounded to state_dtype after every chunk.
    `state_pass` is the kernel's launcher (tests give a torch model of it to check this host side without a
    GPU)."""
    B, T, H, K = q.shape
    V, out_dtype = v.shape[3], v.dtype
    q, k, v = (t.to(torch.float32) for t in (q, k, v))
    g = torch.zeros(B, T, H, device=q.device) if g is None else g.to(torch.float32)
    index, valid = _token_index(B, T, cu_seqlens, q.device)
    N, Tp = index.shape
    C, nC = CHUNK, Tp // CHUNK

    def padded(x):  # [B, T, H, ...] -> [N, H, Tp, ...], zero past each sequence's end
        x = x.reshape(B * T, *x.shape[2:])[index] * valid.view(N, Tp, *[1] * (x.ndim - 2))
        return x.movedim(1, 2).contiguous()

    qp, kp, vp, gp = padded(q), padded(k), padded(v), padded(g[..., None])[..., 0]
    gcum = gp.reshape(N, H, nC, C).cumsum(-1)
    h, _, final = state_pass(kp, None, vp, gcum.reshape(N, H, Tp), initial_state, state_dtype)
    qc, kc, vc = qp.reshape(N, H, nC, C, K), kp.reshape(N, H, nC, C, K), vp.reshape(N, H, nC, C, V)
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    gate = (gcum[..., :, None] - gcum[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    o = (qc * gcum.exp()[..., None]) @ h.float() + ((qc @ kc.transpose(-1, -2)) * gate) @ vc
    o = (scale * o).reshape(N, H, Tp, V).movedim(1, 2)  # [N, Tp, H, V]
    out = torch.empty(B * T, H, V, dtype=out_dtype, device=v.device)
    out[index[valid]] = o[valid].to(out_dtype)
    return out.reshape(B, T, H, V), (final if output_final_state else None)

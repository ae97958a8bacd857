"""fla's naive Kimi Delta Attention (fla/ops/kda/naive.py: plain torch, so it runs on CPU) on the lab's API.

naive_recurrent_kda (mode "recurrent": token by token) and naive_chunk_kda (mode "chunk": chunks of 64, the
per-channel decays inside the products) take [B, T, H, K] keys with [B, T, HV, V] values and [B, HV, K, V] float32
states; they compute in float32 and have no packed sequences, no l2 normalisation and no stored state dtype. So
here: packed sequences run one at a time; use_qk_l2norm normalises q and k before the call (as fla's kernels do
in theirs: x / sqrt(sum(x^2) + 1e-6)); the chunked form needs T % 64 == 0, so each sequence is padded with
tokens that leave the state as it is (g = 0, beta = 0, k = v = 0) and their outputs dropped. state_dtype other
than float32 is refused (ValueError naming it)."""
import torch

from kernellab.validate import check_state_dtype

__all__ = ["fla_kda"]

CHUNK = 64  # naive_chunk_kda's default chunk_size


def _l2norm(x):
    return x * torch.rsqrt((x.float() * x.float()).sum(-1, keepdim=True) + 1e-6).to(x.dtype)


def _padded(x, T):
    """x [1, t, ...] padded with zeros along time to T."""
    return torch.cat([x, x.new_zeros(1, T - x.shape[1], *x.shape[2:])], dim=1) if T > x.shape[1] else x


def fla_kda(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, mode,
            state_dtype):
    """q, k [B, T, Hk, K]; v [B, T, Hv, V]; g [B, T, Hv, K]; beta [B, T, Hv]; initial_state None or [N, Hv, K, V].
    Returns o [B, T, Hv, V] in v's dtype and the final state [N, Hv, K, V] float32 (or None)."""
    check_state_dtype(state_dtype, v, "fla", "kda")
    from fla.ops.kda.naive import naive_chunk_kda, naive_recurrent_kda

    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    B, T, Hv, V = v.shape
    K = q.shape[-1]

    def run(q, k, v, g, beta, h0):
        if mode == "recurrent":
            return naive_recurrent_kda(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=True)
        t = q.shape[1]
        padded = -(-t // CHUNK) * CHUNK
        o, state = naive_chunk_kda(*(_padded(x, padded) for x in (q, k, v, g, beta)), scale=scale,
                                   initial_state=h0, output_final_state=True, chunk_size=CHUNK)
        return o[:, :t], state

    if cu_seqlens is None and mode == "recurrent":
        o, state = run(q, k, v, g, beta, initial_state)
        return o.to(v.dtype), state if output_final_state else None
    o = torch.empty(B, T, Hv, V, dtype=v.dtype, device=v.device)
    states = []
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else None
    spans = [(b, 0, T) for b in range(B)] if bounds is None else [(0, s, e) for s, e in zip(bounds, bounds[1:])]
    for n, (b, s, e) in enumerate(spans):
        h0 = None if initial_state is None else initial_state[n:n + 1]
        if e == s:  # an empty sequence keeps its state
            states.append(torch.zeros(1, Hv, K, V, device=v.device) if h0 is None else h0.float())
            continue
        row = slice(b, b + 1)
        o[row, s:e], state = run(q[row, s:e], k[row, s:e], v[row, s:e], g[row, s:e], beta[row, s:e], h0)
        states.append(state)
    return o, torch.cat(states) if output_final_state else None

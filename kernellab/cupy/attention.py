"""Softmax attention as a CuPy array program: batched cuBLAS matmuls for the scores and the output, a fused
max-shifted exponential for the softmax. Grouped KV heads are repeated; a KV cache longer than q puts query i at
key position Tk - Tq + i (kv_lens[b] - Tq + i for buffers of per-sequence lengths); packed sequences run one
after another. Float32 inside."""
from kernellab.cupy._array import array_module, as_array, as_tensor, softmax, torch_stream


def _attend(xp, qa, ka, va, causal, scale, valid_len=None):
    """qa [B, Hq, Tq, D]; ka, va [B, Hq, Tk, D]; valid_len None or [B] (keys past it are masked) -> [B, Tq, Hq, D]."""
    Tq, Tk = qa.shape[2], ka.shape[2]
    scores = xp.matmul(qa, ka.swapaxes(-1, -2)) * xp.float32(scale)
    last = xp.full((qa.shape[0], 1, 1, 1), Tk) if valid_len is None else valid_len.reshape(-1, 1, 1, 1)
    keys = xp.arange(Tk)
    hidden = keys >= last  # [B, 1, 1, Tk]
    if causal:
        hidden = hidden | (keys > last - Tq + xp.arange(Tq)[:, None])
    scores = xp.where(hidden, -xp.inf, scores).astype(xp.float32)
    return xp.matmul(softmax(xp, scores), va).swapaxes(1, 2)


def attention(q, k, v, causal, scale, cu_seqlens, kv_lens):
    """q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D]; cu_seqlens [N + 1] (B = 1) or kv_lens [B] (the buffer past kv_lens
    must be finite: the masked scores still multiply it). Returns [B, Tq, Hq, D] in q's dtype."""
    xp = array_module(q)
    Hq, Hkv = q.shape[2], k.shape[2]
    with torch_stream(q.device):
        qa = as_array(q, xp).swapaxes(1, 2)  # [B, Hq, Tq, D]
        ka, va = (xp.repeat(as_array(t, xp), Hq // Hkv, axis=2).swapaxes(1, 2) for t in (k, v))
        if cu_seqlens is not None:
            o = xp.zeros(qa.shape[:1] + qa.shape[2:3] + qa.shape[1:2] + qa.shape[3:], dtype=xp.float32)
            bounds = cu_seqlens.tolist()
            for start, end in zip(bounds, bounds[1:]):
                if end > start:
                    o[:, start:end] = _attend(xp, qa[:, :, start:end], ka[:, :, start:end], va[:, :, start:end],
                                              causal, scale)
        else:
            o = _attend(xp, qa, ka, va, causal, scale, None if kv_lens is None else as_array(kv_lens, xp))
        return as_tensor(xp.ascontiguousarray(o)).to(q.dtype)

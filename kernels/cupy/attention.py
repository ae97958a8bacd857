"""Softmax attention as a CuPy array program: batched cuBLAS matmuls for the scores and the output, a fused
max-shifted exponential for the softmax. Grouped KV heads are repeated; a KV cache longer than q puts query i at
key position Tk - Tq + i. Float32 inside."""
from kernels.cupy._array import array_module, as_array, as_tensor, softmax, torch_stream


def attention(q, k, v, causal, scale):
    """q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D]. Returns [B, Tq, Hq, D] in q's dtype."""
    xp = array_module(q)
    Tq, Hq = q.shape[1], q.shape[2]
    Tk, Hkv = k.shape[1], k.shape[2]
    with torch_stream(q.device):
        qa = as_array(q, xp).swapaxes(1, 2)  # [B, Hq, Tq, D]
        ka, va = (xp.repeat(as_array(t, xp), Hq // Hkv, axis=2).swapaxes(1, 2) for t in (k, v))
        scores = xp.matmul(qa, ka.swapaxes(-1, -2)) * xp.float32(scale)
        if causal:
            future = xp.arange(Tk)[None, :] > xp.arange(Tq)[:, None] + (Tk - Tq)
            scores = xp.where(future, -xp.inf, scores).astype(xp.float32)
        o = xp.matmul(softmax(xp, scores), va).swapaxes(1, 2)
        return as_tensor(xp.ascontiguousarray(o)).to(q.dtype)

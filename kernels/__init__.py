"""The lab's public ops (../shared/API.md). Light on import: backends load when first asked for."""
import os

# numba's default OpenMP thread pool spins after each parallel region: on a 2-core machine every torch op that
# follows an mkl / numba call then ran up to 500x slower (a 512 KB copy: 18 ms instead of 0.035, measured in a
# decode step after an mkl prefill). Its workqueue pool sleeps instead. Read when numba is first imported.
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
from kernels.registry import BackendUnavailable, backends, get
from kernels.types import Permutation

__all__ = ["BackendUnavailable", "Permutation", "backends", "get", "linear_attention", "gated_delta_rule",
           "attention", "route", "moe_permute", "moe_unpermute", "grouped_gemm", "moe"]


def linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     mode="auto", backend="auto", **kwargs):
    """Scalar-gated linear attention. q, k [B, T, H, K]; v [B, T, H, V]; g None or [B, T, H] (log decay <= 0);
    initial_state [N, H, K, V] float32; cu_seqlens int [N + 1] with B = 1.
    S_t = exp(g_t) S_{t-1} + k_t v_t^T;  o_t = scale S_t^T q_t.  mode "chunk", "recurrent" or "auto" (a backend
    with one algorithm runs it in both). kwargs: the backend's own keywords (a keyword it lacks is a ValueError).
    Returns (o [B, T, H, V], S [N, H, K, V] or None)."""
    return get("linear_attention", backend)(q, k, v, g=g, scale=scale, initial_state=initial_state,
                                            output_final_state=output_final_state, cu_seqlens=cu_seqlens, mode=mode,
                                            **kwargs)


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm=False, cu_seqlens=None, mode="auto", backend="auto", **kwargs):
    """Gated delta rule. q, k [B, T, Hk, K]; v [B, T, Hv, V], Hv % Hk == 0, value head h reads key head
    h // (Hv // Hk); g, beta [B, T, Hv]; initial_state [N, Hv, K, V] float32.
    S' = exp(g_t) S_{t-1};  u_t = beta_t (v_t - S'^T k_t);  S_t = S' + k_t u_t^T;  o_t = scale S_t^T q_t.
    mode "chunk" (prefill), "recurrent" (decode) or "auto". Returns (o [B, T, Hv, V], S [N, Hv, K, V] or None)."""
    return get("gated_delta_rule", backend)(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                            output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
                                            cu_seqlens=cu_seqlens, mode=mode, **kwargs)


def attention(q, k, v, causal=True, scale=None, cu_seqlens=None, kv_lens=None, backend="auto", **kwargs):
    """Softmax attention with grouped KV heads. q [B, T, Hq, D]; k, v [B, T, Hkv, D]. Returns [B, T, Hq, D].
    k and v may be longer than q (a KV cache): query i then sits at key position Tk - Tq + i.
    cu_seqlens int [N + 1] with B = 1: N packed sequences, each attending within itself. kv_lens int [B]: k, v are
    buffers [B, Tmax, Hkv, D] of which the first kv_lens[b] positions are valid (query i of row b at key
    kv_lens[b] - Tq + i)."""
    return get("attention", backend)(q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens, kv_lens=kv_lens,
                                     **kwargs)


def route(router_logits, top_k, renormalize=True, backend="auto", **kwargs):
    """Softmax (float32) -> top_k -> renormalise. router_logits [N, E] -> (weights float32 [N, top_k],
    ids int32 [N, top_k])."""
    return get("route", backend)(router_logits, top_k, renormalize=renormalize, **kwargs)


def moe_permute(x, ids, num_experts, backend="auto", **kwargs):
    """Group the rows of x [N, D] by expert for ids [N, top_k] in [-1, E). Returns a Permutation."""
    return get("moe_permute", backend)(x, ids, num_experts, **kwargs)


def moe_unpermute(y_sorted, p, weights, backend="auto", **kwargs):
    """y[n] = sum_j weights[n, j] * y_sorted[row of (n, j)]. y_sorted [M, D'], weights [N, top_k] -> [N, D']."""
    return get("moe_unpermute", backend)(y_sorted, p, weights, **kwargs)


def grouped_gemm(x, w, offsets, backend="auto", **kwargs):
    """y[offsets[e]:offsets[e+1]] = x[same rows] @ w[e]^T. x [M, K], w [E, N, K], offsets int32 [E + 1]."""
    return get("grouped_gemm", backend)(x, w, offsets, **kwargs)


def moe(x, weights, ids, w_gate_up, w_down, backend="auto", **kwargs):
    """Qwen3.5 experts: y[n] = sum_j weights[n, j] * (silu(x W_g^T) * (x W_u^T)) W_down[e]^T with e = ids[n, j].
    x [N, D]; weights, ids [N, top_k]; w_gate_up [E, 2I, D]; w_down [E, D, I]. Returns [N, D]."""
    return get("moe", backend)(x, weights, ids, w_gate_up, w_down, **kwargs)

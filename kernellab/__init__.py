"""The lab's public ops (../shared/API.md). Light on import: backends load when first asked for."""
import inspect
import os

# numba's default OpenMP thread pool spins after each parallel region: on a 2-core machine every torch op that
# follows an mkl / numba call then ran up to 500x slower (a 512 KB copy: 18 ms instead of 0.035, measured in a
# decode step after an mkl prefill). Its workqueue pool sleeps instead. Read when numba is first imported.
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
from kernellab import validate
from kernellab.ops import NAMES
from kernellab.registry import BackendUnavailable, backends, get
from kernellab.serving import commit_states
from kernellab.types import Permutation, StateTrace

# The public function of each op of kernellab/ops.py: written below, or made by _public from its check.
__all__ = ["BackendUnavailable", "Permutation", "StateTrace", "backends", "commit_states", "get", *NAMES]


def linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     mode="auto", state_dtype=None, backend="auto", **kwargs):
    """Scalar-gated linear attention. q, k [B, T, H, K]; v [B, T, H, V]; g None or [B, T, H] (log decay <= 0);
    initial_state [N, H, K, V] in state_dtype; cu_seqlens int [N + 1] with B = 1.
    S_t = exp(g_t) S_{t-1} + k_t v_t^T;  o_t = scale S_t^T q_t.  mode "chunk", "recurrent" or "auto" (a backend
    with one algorithm runs it in both). state_dtype: the dtype the state is stored in between steps (token by
    token) or chunks (float32, bfloat16, float16; None: float32, float64 for float64 inputs); the arithmetic stays
    float32. kwargs: the serving keywords (state_indices, output_state_indices, output_intermediate_states,
    chunk_states_every, A_log, dt_bias: docs/api.md "Serving keywords") and the backend's own keywords (a keyword
    it lacks is a ValueError).
    Returns (o [B, T, H, V], S [N, H, K, V] in state_dtype or None), and a StateTrace third with a trace."""
    return get("linear_attention", backend)(q, k, v, g=g, scale=scale, initial_state=initial_state,
                                            output_final_state=output_final_state, cu_seqlens=cu_seqlens, mode=mode,
                                            state_dtype=state_dtype, **kwargs)


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm=False, cu_seqlens=None, mode="auto", state_dtype=None, backend="auto", **kwargs):
    """Gated delta rule. q, k [B, T, Hk, K]; v [B, T, Hv, V], Hv % Hk == 0, value head h reads key head
    h // (Hv // Hk); g, beta [B, T, Hv]; initial_state [N, Hv, K, V] in state_dtype.
    S' = exp(g_t) S_{t-1};  u_t = beta_t (v_t - S'^T k_t);  S_t = S' + k_t u_t^T;  o_t = scale S_t^T q_t.
    mode "chunk" (prefill), "recurrent" (decode) or "auto". state_dtype and kwargs as in linear_attention (the
    serving keywords with beta_logits too).
    Returns (o [B, T, Hv, V], S [N, Hv, K, V] in state_dtype or None), and a StateTrace third with a trace."""
    return get("gated_delta_rule", backend)(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                            output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
                                            cu_seqlens=cu_seqlens, mode=mode, state_dtype=state_dtype, **kwargs)


def kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm=False,
        cu_seqlens=None, mode="auto", state_dtype=None, backend="auto", **kwargs):
    """Kimi Delta Attention: the gated delta rule with a decay per key channel. q, k [B, T, Hk, K];
    v [B, T, Hv, V], Hv % Hk == 0, value head h reads key head h // (Hv // Hk); g [B, T, Hv, K] (log decay <= 0);
    beta [B, T, Hv]; initial_state [N, Hv, K, V] in state_dtype.
    S' = Diag(exp(g_t)) S_{t-1};  u_t = beta_t (v_t - S'^T k_t);  S_t = S' + k_t u_t^T;  o_t = scale S_t^T q_t.
    mode and state_dtype as in gated_delta_rule. Returns (o [B, T, Hv, V], S [N, Hv, K, V] in state_dtype or None)."""
    return get("kda", backend)(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
                               cu_seqlens=cu_seqlens, mode=mode, state_dtype=state_dtype, **kwargs)


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


def grouped_gemm_fp8(x, w, w_scale, offsets, backend="auto", **kwargs):
    """grouped_gemm on float8_e4m3fn weights (kernellab/fp8.py). x [M, K] (rows grouped by expert) is quantized to
    float8_e4m3fn in blocks of 1 x 128; w float8_e4m3fn [E, N, K] with w_scale float32 [E, ceil(N / 128),
    ceil(K / 128)] (blocks of 128 x 128). y[offsets[e]:offsets[e+1]] = dequant(x_q)[same rows] @ dequant(w[e])^T.
    Returns [M, N] in x's dtype."""
    return get("grouped_gemm_fp8", backend)(x, w, w_scale, offsets, **kwargs)


def moe_fp8(x, weights, ids, w_gate_up, w_gate_up_scale, w_down, w_down_scale, backend="auto", **kwargs):
    """moe on float8_e4m3fn expert weights with 128 x 128 block scales: x [N, D] is quantized in blocks of 1 x 128
    before the gate/up GEMM, h = silu(x W_g^T) * (x W_u^T) (float32) likewise before the down GEMM.
    w_gate_up [E, 2I, D], w_down [E, D, I] float8_e4m3fn; their scales float32 [E, ceil(rows / 128),
    ceil(cols / 128)]. Returns [N, D] in x's dtype."""
    return get("moe_fp8", backend)(x, weights, ids, w_gate_up, w_gate_up_scale, w_down, w_down_scale, **kwargs)


def _public(op: str):
    """kernellab.<op> for an op of kernellab/ops.py without a function written above: kernellab.validate.<op>'s
    signature and docstring, plus backend="auto" and the backend's own keywords."""
    check = getattr(validate, op)

    def call(*args, backend="auto", **kwargs):
        return get(op, backend)(*args, **kwargs)

    parameters = [*inspect.signature(check).parameters.values(),
                  inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto"),
                  inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    call.__signature__ = inspect.Signature(parameters)
    call.__name__ = call.__qualname__ = op
    call.__doc__ = check.__doc__
    return call


for _op in NAMES:
    if _op not in globals():
        globals()[_op] = _public(_op)

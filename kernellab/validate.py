"""Input checks shared by every backend.

One function per op, with the op's public signature (API.md) minus `backend`. Each raises ValueError
naming the offending argument, and otherwise returns the arguments as a dict of keywords, normalised
(scale resolved to a float, mode resolved to "chunk" or "recurrent"), ready for a backend's
implementation. Nothing is computed and nothing is written before every check has passed.

Checks on tensor *values* (ids in range, monotone offsets) read the tensor on the host. On a GPU
that is a synchronisation, so they are skipped while a CUDA graph is being captured and when the
environment sets KERNELLAB_TRUST_INPUTS=1 (benchmarks of the launch path set it).
"""
from __future__ import annotations

import math
import os

import torch

from kernellab.fp8 import FP8, WEIGHT_BLOCK, scale_shape
from kernellab.types import Permutation

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
STATE_DTYPES = (torch.float32, torch.float64)
# The dtypes a recurrent state may be stored in between steps (state_dtype); the arithmetic stays float32 (float64
# for float64 inputs). float64 is the default of float64 inputs, accepted for them only.
STORED_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The code of each stored state dtype for the compiled kernels that round their float32 state (mkl's numba loop,
# Triton's state passes): 0 nothing to round, 1 bfloat16, 2 float16.
STATE_ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
INDEX_DTYPES = (torch.int32, torch.int64)
# Below this many tokens per sequence, "auto" runs the gated delta rule token by token (decode).
RECURRENT_MAX_T = 64
# Log decays below this are raised to it before any backend sees them (docs/api.md "Values outside the domain"):
# exp(-41) = 1.6e-18, which the kernels flush to an exact 0 (kernellab.torch.linear_attention.LOG_DECAY_FLOOR =
# -40), so g = -inf and g = -3e38 are a decay of exactly 0 on every backend, and a chunk's float32 cumulative sum
# of log decays never absorbs its later terms into one huge one.
LOG_DECAY_MIN = -41.0
# The serving keywords of the linear attentions (docs/api.md, "Serving keywords ..."; kernellab/serving.py) and
# their defaults. A checked call carries only those it sets: a call without them is checked and run as before.
SERVING_DEFAULTS = dict(state_indices=None, output_state_indices=None, output_intermediate_states=False,
                        chunk_states_every=None, A_log=None, dt_bias=None, beta_logits=False)


def auto_mode(T: int, cu_seqlens) -> str:
    """The linear attentions' mode "auto": "recurrent" for RECURRENT_MAX_T tokens per sequence or fewer (T tokens,
    packed into cu_seqlens' sequences when given), else "chunk"."""
    per_sequence = T if cu_seqlens is None else T // max(1, cu_seqlens.shape[0] - 1)
    return "recurrent" if per_sequence <= RECURRENT_MAX_T else "chunk"


def trusted_inputs() -> bool:
    """KERNELLAB_TRUST_INPUTS=1: the caller vouches for its inputs' values (and its weights' packs): value checks
    are skipped."""
    return os.environ.get("KERNELLAB_TRUST_INPUTS") == "1"


def _check_values() -> bool:
    if trusted_inputs():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _tensor(name, x, ndim, dtypes=FLOAT_DTYPES):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {x.dtype}")
    return x


def _shape(name, x, expected, described):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {described} = {tuple(expected)}, got {tuple(x.shape)}")


def _same_device(ref_name, ref, **tensors):
    for name, x in tensors.items():
        if x is not None and x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def _same_dtype(ref_name, ref, **tensors):
    for name, x in tensors.items():
        if x.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}")


def _scale(scale, head_dim):
    if scale is None:
        return head_dim ** -0.5
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be None or a finite number, got {scale!r}")
    return float(scale)


def _offsets(name, offsets, total, what):
    """offsets: int [n + 1] with offsets[0] = 0, offsets[-1] = total, non-decreasing."""
    _tensor(name, offsets, 1, INDEX_DTYPES)
    if offsets.shape[0] < 2:
        raise ValueError(f"{name} must have at least 2 entries, got {offsets.shape[0]}")
    if _check_values():
        host = offsets.tolist()
        if host[0] != 0 or host[-1] != total:
            raise ValueError(f"{name} must start at 0 and end at {what} = {total}, got {host[0]} .. {host[-1]}")
        if any(b < a for a, b in zip(host, host[1:])):
            raise ValueError(f"{name} must be non-decreasing, got {host}")


def default_state_dtype(v: torch.Tensor) -> torch.dtype:
    """The state dtype when the call names none: float32, float64 for float64 inputs (the yardstick)."""
    return torch.float64 if v.dtype == torch.float64 else torch.float32


def _state_dtype(state_dtype, v):
    """state_dtype resolved: None is default_state_dtype(v); else one of STORED_STATE_DTYPES (float64 as well for
    float64 inputs)."""
    if state_dtype is None:
        return default_state_dtype(v)
    allowed = STORED_STATE_DTYPES + ((torch.float64,) if v.dtype == torch.float64 else ())
    if not isinstance(state_dtype, torch.dtype) or state_dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"state_dtype must be None or a torch dtype in ({names}) for {v.dtype} inputs, "
                         f"got {state_dtype!r}")
    return state_dtype


def _state(initial_state, expected, described, state_dtype, named):
    """initial_state None or [expected] in state_dtype (named: the call gave state_dtype), or, when it did not,
    float32 or float64 as before state_dtype existed."""
    if initial_state is None:
        return
    _tensor("initial_state", initial_state, 4, FLOAT_DTYPES if named else STATE_DTYPES)
    if named and initial_state.dtype != state_dtype:
        raise ValueError(f"initial_state must have dtype state_dtype = {str(state_dtype).removeprefix('torch.')}, "
                         f"got {initial_state.dtype}")
    _shape("initial_state", initial_state, expected, described)


def check_state_dtype(state_dtype: torch.dtype, v: torch.Tensor, backend: str, op: str) -> None:
    """For the backends that store their state in the default dtype only (float32; float64 for float64 inputs):
    ValueError naming state_dtype when a call asks for another."""
    if state_dtype != default_state_dtype(v):
        raise ValueError(f"state_dtype: backend {backend!r} of {op} stores its recurrent state in "
                         f"{str(default_state_dtype(v)).removeprefix('torch.')} only, got "
                         f"{str(state_dtype).removeprefix('torch.')} (other backends implement it)")


def _finite(name, x):
    """ValueError naming x unless every element of x is finite. One reduction as a screen (a sum is finite when
    every term is, unless it overflows: only then the exact elementwise test), read on the host."""
    x = x.detach()
    if not torch.isfinite(x.sum()) and not bool(torch.isfinite(x).all()):
        raise _not_finite(name)


class NotFinite(ValueError):
    """An input holds NaN or infinite values where the op's domain has none (docs/api.md: values outside the
    domain); a ValueError, told apart by callers for which it means that their own numbers blew up (training)."""


def _not_finite(name):
    return NotFinite(f"{name} must be finite, got NaN or infinite values (docs/api.md: values outside the domain)")


def _kv_buffer(name, x, kv_lens, lo, hi):
    """x [B, Tk, H, D], a KV buffer of which the first kv_lens[b] positions of row b are valid (lo, hi: kv_lens'
    min and max): ValueError naming x when a valid position holds a non-finite value; when a position past
    kv_lens does, x with those positions zeroed (a copy: they are never read, but a masked score still
    multiplies its value, and 0 * NaN is NaN); else x itself. Sums as screens, per position only in the band
    [lo, hi) where rows differ: no allocation that grows with the buffer unless a copy is needed."""
    data = x.detach()
    _finite(name, data[:, :lo])
    garbage = not bool(torch.isfinite(data[:, hi:].sum()))  # an overflowing sum only costs a needless copy
    if hi > lo:
        valid = torch.arange(lo, hi, device=x.device) < kv_lens[:, None]  # [B, hi - lo]
        rows = ~torch.isfinite(data[:, lo:hi].sum(dim=(2, 3)))
        flagged = rows & valid
        if bool(flagged.any()) and not bool(torch.isfinite(data[:, lo:hi][flagged]).all()):
            raise _not_finite(name)
        garbage = garbage or bool((rows & ~valid).any())
    if not garbage:
        return x
    valid = torch.arange(x.shape[1], device=x.device) < kv_lens[:, None]
    return torch.where(valid[:, :, None, None], x, 0)


def _recurrent_domain(q, k, v, g, beta, initial_state, raw_g=False, raw_beta=False):
    """The linear attentions' value checks (docs/api.md "Values outside the domain"), one host read for all:
    q, k, v, initial_state finite; g without NaN and <= 0; beta in [0, 1] (ValueError naming the argument); with
    fused gating (raw_g: g is the raw gate input a; raw_beta: beta holds logits) those finite instead.
    Returns g, with -inf and every value below LOG_DECAY_MIN raised to LOG_DECAY_MIN (a new tensor; g's gradient
    passes where it was not raised; a raw g as given). Skipped with the other value checks (_check_values): g as
    given."""
    if not _check_values():
        return g
    sums = {name: x for name, x in (("q", q), ("k", k), ("v", v), ("initial_state", initial_state),
                                    ("g", g if raw_g else None), ("beta", beta if raw_beta else None)) if x is not None}
    ranges = {name: x for name, x in (("g", None if raw_g else g), ("beta", None if raw_beta else beta))
              if x is not None}
    # device-side reductions first, then one transfer: on a GPU, one synchronisation per call
    found = torch.stack([x.detach().sum().double() for x in sums.values()]
                        + [y.double() for x in ranges.values() for y in torch.aminmax(x.detach())]).tolist()
    for (name, x), total in zip(sums.items(), found):
        if not math.isfinite(total):
            _finite(name, x)  # the exact test: a sum of finite values may overflow
    bounds = dict(zip(ranges, zip(found[len(sums)::2], found[len(sums) + 1::2])))
    if "beta" in bounds:
        lo, hi = bounds["beta"]
        if not (0.0 <= lo and hi <= 1.0):  # NaN fails both
            raise ValueError(f"beta must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    if g is None or raw_g:
        return g
    lo, hi = bounds["g"]
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError("g must not hold NaN (a log decay in [-inf, 0])")
    if hi > 0:
        raise ValueError(f"g must be <= 0 (the log of a decay in [0, 1]), got values up to {hi:.4g}")
    return g.clamp(min=LOG_DECAY_MIN) if lo < LOG_DECAY_MIN else g


def _recurrent_inputs(q, k, v, heads_k, initial_state, cu_seqlens, state_dtype=None, pooled=False, **per_step):
    """Shared checks of the two linear-attention recurrences (pooled: initial_state is a pool [P, Hv, K, V] of any
    P); returns the number of sequences N and the state dtype resolved."""
    _tensor("q", q, 4)
    _tensor("k", k, 4)
    _tensor("v", v, 4)
    B, T, H, K = q.shape
    _shape("k", k, (B, T, H, K), "[B, T, H, K] of q")
    _same_dtype("q", q, k=k, v=v)
    _same_device("q", q, k=k, v=v, initial_state=initial_state, cu_seqlens=cu_seqlens, **per_step)
    if v.shape[:2] != (B, T):
        raise ValueError(f"v must have batch and time {(B, T)} of q, got shape {tuple(v.shape)}")
    Hv, V = v.shape[2], v.shape[3]
    if Hv % heads_k != 0:
        raise ValueError(f"v has {Hv} heads, not a multiple of the {heads_k} heads of q and k (Hv % Hk != 0)")
    for name, x in per_step.items():
        if x is not None:
            _tensor(name, x, 3)
            _shape(name, x, (B, T, Hv), "[B, T, Hv]")
    if min(B, T, H, K, V) == 0:
        raise ValueError(f"q, k, v must be non-empty, got q {tuple(q.shape)} and v {tuple(v.shape)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch size 1 (sequences packed along time), got B = {B}")
        _offsets("cu_seqlens", cu_seqlens, T, "T")
        N = cu_seqlens.shape[0] - 1
    else:
        N = B
    resolved = _state_dtype(state_dtype, v)
    if pooled and isinstance(initial_state, torch.Tensor) and initial_state.ndim == 4 and initial_state.shape[0]:
        _state(initial_state, (initial_state.shape[0], Hv, K, V), "[P, Hv, K, V] (a pool)", resolved,
               state_dtype is not None)
    else:
        _state(initial_state, (N, Hv, K, V), "[P, Hv, K, V] with P >= 1 (a pool)" if pooled else "[N, Hv, K, V]",
               resolved, state_dtype is not None)
    return N, resolved


def _pooled(state_indices, output_state_indices) -> bool:
    """Whether initial_state is a pool (state_indices given); output_state_indices without it is a ValueError."""
    if state_indices is None and output_state_indices is not None:
        raise ValueError("output_state_indices needs state_indices (the pool's rows read)")
    return state_indices is not None


def _rows(name, x, N, P):
    """x None or int [N] of rows of a pool of P: each in [-1, P) (-1: a padding slot), no row twice."""
    if x is None:
        return
    _tensor(name, x, 1, INDEX_DTYPES)
    _shape(name, x, (N,), "[N] (one per sequence)")
    if _check_values() and N:
        host = x.tolist()
        if not all(-1 <= row < P for row in host):
            raise ValueError(f"{name} must lie in [-1, {P}) (rows of the pool; -1: a padding slot), got values in "
                             f"[{min(host)}, {max(host)}]")
        used = [row for row in host if row >= 0]
        if len(set(used)) != len(used):
            raise ValueError(f"{name} must not name a row of the pool twice, got duplicates in {host}")


def _serving(q, v, g, N, initial_state, output_final_state, gate_shape, state_indices=None,
             output_state_indices=None, output_intermediate_states=False, chunk_states_every=None, A_log=None,
             dt_bias=None, beta_logits=False):
    """The serving keywords' checks (docs/api.md "Serving keywords"): N sequences; gate_shape the shape of dt_bias
    ((Hv,), or (Hv, K) for kda). Returns the keywords a call sets (those away from SERVING_DEFAULTS), normalised,
    and the rows the call reads from the pool (None without one: for the domain checks)."""
    if state_indices is not None:
        if initial_state is None:
            raise ValueError("state_indices needs initial_state, the pool [P, Hv, K, V] it indexes")
        if output_final_state:
            raise ValueError("output_final_state must be False with state_indices: the final states are written "
                             "into the pool (initial_state), and the op returns None in their place")
        _same_device("q", q, state_indices=state_indices, output_state_indices=output_state_indices)
        _rows("state_indices", state_indices, N, initial_state.shape[0])
    _rows("output_state_indices", output_state_indices, N, 0 if initial_state is None else initial_state.shape[0])
    if chunk_states_every is not None and (isinstance(chunk_states_every, bool) or not isinstance(
            chunk_states_every, int) or chunk_states_every < 1):
        raise ValueError(f"chunk_states_every must be None or an int >= 1, got {chunk_states_every!r}")
    if output_intermediate_states and chunk_states_every is not None:
        raise ValueError("output_intermediate_states and chunk_states_every cannot be given together (one trace "
                         "per call)")
    if (A_log is None) != (dt_bias is None):
        raise ValueError(f"{'dt_bias' if A_log is not None else 'A_log'} must be given with "
                         f"{'A_log' if A_log is not None else 'dt_bias'} (fused gating takes both), got None")
    if A_log is not None:
        if g is None:
            raise ValueError("g must hold the raw gate input a with A_log and dt_bias, got None")
        _tensor("A_log", A_log, 1)
        _shape("A_log", A_log, gate_shape[:1], "[Hv]")
        _tensor("dt_bias", dt_bias, len(gate_shape))
        _shape("dt_bias", dt_bias, gate_shape, "[Hv]" if len(gate_shape) == 1 else "[Hv, K]")
        _same_device("q", q, A_log=A_log, dt_bias=dt_bias)
        if _check_values():
            _finite("A_log", A_log)
            _finite("dt_bias", dt_bias)
    found = dict(state_indices=state_indices, output_state_indices=output_state_indices,
                 output_intermediate_states=bool(output_intermediate_states), chunk_states_every=chunk_states_every,
                 A_log=A_log, dt_bias=dt_bias, beta_logits=bool(beta_logits))
    read = None
    if state_indices is not None and _check_values():
        read = initial_state.index_select(0, state_indices[state_indices >= 0].long())
    return {name: value for name, value in found.items() if value is not None and value is not False}, read


def _mode(mode, T, cu_seqlens):
    if mode not in ("auto", "chunk", "recurrent"):
        raise ValueError(f"mode must be 'auto', 'chunk' or 'recurrent', got {mode!r}")
    return auto_mode(T, cu_seqlens) if mode == "auto" else mode


def linear_attention(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     mode="auto", state_dtype=None, state_indices=None, output_state_indices=None,
                     output_intermediate_states=False, chunk_states_every=None, A_log=None, dt_bias=None):
    N, state_dtype = _recurrent_inputs(q, k, v, q.shape[2] if isinstance(q, torch.Tensor) and q.ndim == 4 else 1,
                                       initial_state, cu_seqlens, state_dtype,
                                       _pooled(state_indices, output_state_indices), g=g)
    if v.shape[2] != q.shape[2]:
        raise ValueError(f"v must have the {q.shape[2]} heads of q, got {v.shape[2]}")
    serving, read = _serving(q, v, g, N, initial_state, output_final_state, (v.shape[2],), state_indices,
                             output_state_indices, output_intermediate_states, chunk_states_every, A_log, dt_bias)
    g = _recurrent_domain(q, k, v, g, None, initial_state if state_indices is None else read, raw_g=A_log is not None)
    return dict(q=q, k=k, v=v, g=g, scale=_scale(scale, q.shape[-1]), initial_state=initial_state,
                output_final_state=bool(output_final_state), cu_seqlens=cu_seqlens,
                mode=_mode(mode, q.shape[1], cu_seqlens), state_dtype=state_dtype, **serving)


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm=False, cu_seqlens=None, mode="auto", state_dtype=None, state_indices=None,
                     output_state_indices=None, output_intermediate_states=False, chunk_states_every=None, A_log=None,
                     dt_bias=None, beta_logits=False):
    if g is None:
        raise ValueError("g must be a tensor [B, T, Hv], got None")
    if beta is None:
        raise ValueError("beta must be a tensor [B, T, Hv], got None")
    heads_k = q.shape[2] if isinstance(q, torch.Tensor) and q.ndim == 4 else 1
    N, state_dtype = _recurrent_inputs(q, k, v, heads_k, initial_state, cu_seqlens, state_dtype,
                                       _pooled(state_indices, output_state_indices), g=g, beta=beta)
    serving, read = _serving(q, v, g, N, initial_state, output_final_state, (v.shape[2],), state_indices,
                             output_state_indices, output_intermediate_states, chunk_states_every, A_log, dt_bias,
                             beta_logits)
    g = _recurrent_domain(q, k, v, g, beta, initial_state if state_indices is None else read,
                          raw_g=A_log is not None, raw_beta=bool(beta_logits))
    return dict(q=q, k=k, v=v, g=g, beta=beta, scale=_scale(scale, q.shape[-1]), initial_state=initial_state,
                output_final_state=bool(output_final_state), use_qk_l2norm=bool(use_qk_l2norm),
                cu_seqlens=cu_seqlens, mode=_mode(mode, q.shape[1], cu_seqlens), state_dtype=state_dtype, **serving)


def kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, use_qk_l2norm=False,
        cu_seqlens=None, mode="auto", state_dtype=None, state_indices=None, output_state_indices=None,
        output_intermediate_states=False, chunk_states_every=None, A_log=None, dt_bias=None, beta_logits=False):
    """gated_delta_rule's checks, with g [B, T, Hv, K] (a log decay per key channel) in place of [B, T, Hv]
    (dt_bias [Hv, K] with fused gating)."""
    if g is None:
        raise ValueError("g must be a tensor [B, T, Hv, K], got None")
    if beta is None:
        raise ValueError("beta must be a tensor [B, T, Hv], got None")
    heads_k = q.shape[2] if isinstance(q, torch.Tensor) and q.ndim == 4 else 1
    N, state_dtype = _recurrent_inputs(q, k, v, heads_k, initial_state, cu_seqlens, state_dtype,
                                       _pooled(state_indices, output_state_indices), beta=beta)
    _tensor("g", g, 4)
    _same_device("q", q, g=g)
    _shape("g", g, (*v.shape[:3], q.shape[3]), "[B, T, Hv, K]")
    serving, _ = _serving(q, v, g, N, initial_state, output_final_state, (v.shape[2], q.shape[3]), state_indices,
                          output_state_indices, output_intermediate_states, chunk_states_every, A_log, dt_bias,
                          beta_logits)
    return dict(q=q, k=k, v=v, g=g, beta=beta, scale=_scale(scale, q.shape[-1]), initial_state=initial_state,
                output_final_state=bool(output_final_state), use_qk_l2norm=bool(use_qk_l2norm),
                cu_seqlens=cu_seqlens, mode=_mode(mode, q.shape[1], cu_seqlens), state_dtype=state_dtype, **serving)


def commit_states(pool, states, state_indices, cu_seqlens, accepted):
    """kernellab.commit_states' checks: pool [P, Hv, K, V]; states [M, Hv, K, V] of pool's dtype and device;
    state_indices int [N] in [-1, P), no row twice; cu_seqlens int [N + 1] from 0 to M, non-decreasing; accepted
    int [N] with 0 <= accepted[n] <= cu_seqlens[n + 1] - cu_seqlens[n]."""
    _tensor("pool", pool, 4)
    _tensor("states", states, 4, (pool.dtype,))
    if tuple(states.shape[1:]) != tuple(pool.shape[1:]):
        raise ValueError(f"states must be [M, Hv, K, V] with the pool's {tuple(pool.shape[1:])}, got "
                         f"{tuple(states.shape)}")
    _same_device("pool", pool, states=states, state_indices=state_indices, cu_seqlens=cu_seqlens, accepted=accepted)
    _offsets("cu_seqlens", cu_seqlens, states.shape[0], "M (states' rows)")
    N = cu_seqlens.shape[0] - 1
    _rows("state_indices", state_indices, N, pool.shape[0])
    _tensor("accepted", accepted, 1, INDEX_DTYPES)
    _shape("accepted", accepted, (N,), "[N]")
    if _check_values():
        room = cu_seqlens.diff()
        if bool(((accepted < 0) | (accepted > room)).any()):
            raise ValueError(f"accepted must lie in [0, the sequence's length] = [0, {room.tolist()}], got "
                             f"{accepted.tolist()}")


def attention(q, k, v, causal=True, scale=None, cu_seqlens=None, kv_lens=None):
    """k, v may be longer than q (a KV cache): query i then sits at key position Tk - Tq + i.
    cu_seqlens int [N + 1] with B == 1: q, k, v hold N packed sequences (k and v with q's T), each attending
    within itself. kv_lens int [B]: k, v are buffers of which the first kv_lens[b] positions are valid
    (Tq <= kv_lens[b] <= Tk); query i of sequence b then sits at key position kv_lens[b] - Tq + i."""
    _tensor("q", q, 4)
    _tensor("k", k, 4)
    _tensor("v", v, 4)
    _same_dtype("q", q, k=k, v=v)
    _same_device("q", q, k=k, v=v, cu_seqlens=cu_seqlens, kv_lens=kv_lens)
    B, Tq, Hq, D = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    Bk, Tk, Hkv, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"k must have batch {B} and head dim {D} of q, got shape {tuple(k.shape)}")
    if Tk < Tq:
        raise ValueError(f"k and v must have at least the {Tq} positions of q, got {Tk}")
    if Hq % Hkv != 0:
        raise ValueError(f"q has {Hq} heads, not a multiple of the {Hkv} heads of k and v")
    if min(B, Tq, Hq, D) == 0:
        raise ValueError(f"q must be non-empty, got shape {tuple(q.shape)}")
    if cu_seqlens is not None:
        if kv_lens is not None:
            raise ValueError("cu_seqlens and kv_lens cannot be given together (packed sequences attend within "
                             "themselves; kv_lens is for decoding against a KV buffer)")
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch size 1 (sequences packed along time), got B = {B}")
        if Tk != Tq:
            raise ValueError(f"with cu_seqlens, k and v must have the {Tq} positions of q, got {Tk}")
        _offsets("cu_seqlens", cu_seqlens, Tq, "T")
    if kv_lens is not None:
        _tensor("kv_lens", kv_lens, 1, INDEX_DTYPES)
        _shape("kv_lens", kv_lens, (B,), "[B]")
        if _check_values():
            lo, hi = int(kv_lens.min()), int(kv_lens.max())
            if lo < Tq or hi > Tk:
                raise ValueError(f"kv_lens must lie in [Tq, Tk] = [{Tq}, {Tk}] (each sequence's queries are its "
                                 f"last Tq valid positions), got values in [{lo}, {hi}]")
    if _check_values():
        _finite("q", q)
        if kv_lens is None:
            _finite("k", k)
            _finite("v", v)
        else:  # positions past kv_lens are never read: they may hold anything (a cache's unwritten rows)
            k, v = _kv_buffer("k", k, kv_lens, lo, hi), _kv_buffer("v", v, kv_lens, lo, hi)
    return dict(q=q, k=k, v=v, causal=bool(causal), scale=_scale(scale, D), cu_seqlens=cu_seqlens, kv_lens=kv_lens)


def route(router_logits, top_k, renormalize=True):
    _tensor("router_logits", router_logits, 2)
    N, E = router_logits.shape
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, {E}] (the number of experts), got {top_k!r}")
    if _check_values():
        _finite("router_logits", router_logits)  # NaN has no rank: top-k would pick by each backend's own rule
    return dict(router_logits=router_logits, top_k=top_k, renormalize=bool(renormalize))


def _ids(ids, num_tokens, num_experts):
    """ids [num_tokens, top_k] in [-1, num_experts); num_experts None: the shape only (the caller checks the range
    with ids_range and check_ids_range)."""
    _tensor("ids", ids, 2, INDEX_DTYPES)
    if ids.shape[0] != num_tokens:
        raise ValueError(f"ids must have {num_tokens} rows (one per token), got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("ids must have at least one column (top_k >= 1)")
    if num_experts is not None and (found := ids_range(ids)) is not None:
        check_ids_range(*found, num_experts)


def ids_range(ids):
    """(min, max) of ids, read on the host; None when ids is empty or values are not checked (KERNELLAB_TRUST_INPUTS,
    CUDA graph capture)."""
    if _check_values() and ids.numel():
        return int(ids.min()), int(ids.max())
    return None


def check_ids_range(lo, hi, num_experts, where=""):
    """ValueError unless the values lo..hi of ids lie in [-1, num_experts); `where` ends the message."""
    if lo < -1 or hi >= num_experts:
        raise ValueError(f"ids must lie in [-1, {num_experts}) (-1 = no expert), got values in [{lo}, {hi}]{where}")


def _num_experts(num_experts):
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")


def moe_permute(x, ids, num_experts):
    _tensor("x", x, 2)
    _num_experts(num_experts)
    if isinstance(ids, torch.Tensor):  # before the range check reads ids on their device
        _same_device("x", x, ids=ids)
    _ids(ids, x.shape[0], num_experts)
    return dict(x=x, ids=ids, num_experts=num_experts)


def _permutation(p):
    """A Permutation's own structure (it may be built by hand): source int [M] on offsets' device, offsets
    [E + 1] from 0 to M, non-decreasing, and every source a distinct slot in [0, num_tokens * top_k) (values read
    on the host, skipped with the other value checks): an index out of range would be read or written out of
    bounds by the compiled backends."""
    _tensor("p.source", p.source, 1, INDEX_DTYPES)
    _same_device("p.source", p.source, **{"p.offsets": p.offsets})
    for name in ("num_tokens", "top_k"):
        value = getattr(p, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "num_tokens" else 1):
            raise ValueError(f"p.{name} must be a {'non-negative' if name == 'num_tokens' else 'positive'} int, "
                             f"got {value!r}")
    M, slots = p.source.shape[0], p.num_tokens * p.top_k
    _offsets("p.offsets", p.offsets, M, "M (p.source's length)")
    if M > slots:
        raise ValueError(f"p.source has {M} rows, more than the {slots} slots (num_tokens * top_k) of p")
    if _check_values() and M:
        lo, hi = int(p.source.min()), int(p.source.max())
        if lo < 0 or hi >= slots:
            raise ValueError(f"p.source must lie in [0, {slots}) (num_tokens * top_k), got values in [{lo}, {hi}]")
        if int(torch.bincount(p.source.to(torch.int64), minlength=slots).max()) > 1:
            raise ValueError("p.source must name each slot at most once, got a repeated slot")


def moe_unpermute(y_sorted, p, weights):
    if not isinstance(p, Permutation):
        raise ValueError(f"p must be a kernellab.Permutation (from moe_permute), got {type(p).__name__}")
    _permutation(p)
    _tensor("y_sorted", y_sorted, 2)
    if y_sorted.shape[0] != p.source.shape[0]:
        raise ValueError(f"y_sorted must have the {p.source.shape[0]} rows of p, got {y_sorted.shape[0]}")
    _tensor("weights", weights, 2)
    _shape("weights", weights, (p.num_tokens, p.top_k), "[N, top_k] of p")
    _same_device("y_sorted", y_sorted, weights=weights, **{"p.source": p.source})
    if _check_values():
        _finite("y_sorted", y_sorted)
        # a slot with no expert is never read: its weight may hold anything
        _finite("weights", weights.reshape(-1)[p.source.to(torch.int64)])
    return dict(y_sorted=y_sorted, p=p, weights=weights)


def grouped_gemm(x, w, offsets):
    _tensor("x", x, 2)
    _tensor("w", w, 3)
    _same_dtype("x", x, w=w)
    _same_device("x", x, w=w, offsets=offsets)
    if w.shape[2] != x.shape[1]:
        raise ValueError(f"w must be [E, N, K] with K = {x.shape[1]} (x's columns), got shape {tuple(w.shape)}")
    _offsets("offsets", offsets, x.shape[0], "M (x's rows)")
    if offsets.shape[0] != w.shape[0] + 1:
        raise ValueError(f"offsets must have E + 1 = {w.shape[0] + 1} entries (E = w.shape[0]), got {offsets.shape[0]}")
    if _check_values():
        _finite("x", x)  # the weights are not read here: a pass over every expert per call (docs/api.md)
    return dict(x=x, w=w, offsets=offsets)


def moe(x, weights, ids, w_gate_up, w_down):
    checked = moe_shapes(x, weights, ids, w_gate_up, w_down)
    if (found := ids_range(ids)) is not None:
        check_ids_range(*found, w_gate_up.shape[0])
    if _check_values():
        _finite("x", x)
        _finite("weights", torch.where(ids >= 0, weights, 0))  # a slot with no expert is never read
    return checked


def moe_shapes(x, weights, ids, w_gate_up, w_down):
    """moe's checks of types, dtypes, devices and shapes, not of the ids' values: kernellab.distributed.moe_ep checks
    those against the experts of all its ranks (w_gate_up holds one rank's share)."""
    _tensor("x", x, 2)
    _tensor("w_gate_up", w_gate_up, 3)
    _tensor("w_down", w_down, 3)
    _tensor("weights", weights, 2)
    _same_dtype("x", x, w_gate_up=w_gate_up, w_down=w_down)
    _same_device("x", x, weights=weights, ids=ids, w_gate_up=w_gate_up, w_down=w_down)
    _expert_layer_shapes(x, weights, ids, w_gate_up, w_down, check_ids=False)
    return dict(x=x, weights=weights, ids=ids, w_gate_up=w_gate_up, w_down=w_down)


def _expert_layer_shapes(x, weights, ids, w_gate_up, w_down, check_ids: bool):
    """The MoE layer's shapes: x [N, D], w_gate_up [E, 2I, D], w_down [E, D, I], ids and weights [N, top_k] (the
    ids' values in [-1, E) too when check_ids)."""
    N, D = x.shape
    E, two_I, D_in = w_gate_up.shape
    if D_in != D or two_I % 2:
        raise ValueError(f"w_gate_up must be [E, 2I, D] with D = {D}, got shape {tuple(w_gate_up.shape)}")
    _shape("w_down", w_down, (E, D, two_I // 2), "[E, D, I]")
    _ids(ids, N, E if check_ids else None)
    _shape("weights", weights, ids.shape, "[N, top_k] of ids")


# ------------------------------------------------------------------------------------ fp8 experts

def _fp8_weight(name, w, scale_name, scale, ndim=3):
    """w float8_e4m3fn with ndim dims and its block scales [..., ceil(N / 128), ceil(K / 128)], float32 (float64
    as well: the float64 yardstick's inputs)."""
    _tensor(name, w, ndim, (FP8,))
    _tensor(scale_name, scale, ndim, (torch.float32, torch.float64))
    expected = scale_shape(tuple(w.shape), WEIGHT_BLOCK)
    _shape(scale_name, scale, expected, f"[E, ceil(rows / 128), ceil(cols / 128)] of {name}")


def grouped_gemm_fp8(x, w, w_scale, offsets):
    _tensor("x", x, 2)
    _fp8_weight("w", w, "w_scale", w_scale)
    _same_device("x", x, w=w, w_scale=w_scale, offsets=offsets)
    if w.shape[2] != x.shape[1]:
        raise ValueError(f"w must be [E, N, K] with K = {x.shape[1]} (x's columns), got shape {tuple(w.shape)}")
    _offsets("offsets", offsets, x.shape[0], "M (x's rows)")
    if offsets.shape[0] != w.shape[0] + 1:
        raise ValueError(f"offsets must have E + 1 = {w.shape[0] + 1} entries (E = w.shape[0]), got {offsets.shape[0]}")
    return dict(x=x, w=w, w_scale=w_scale, offsets=offsets)


def moe_fp8(x, weights, ids, w_gate_up, w_gate_up_scale, w_down, w_down_scale):
    _tensor("x", x, 2)
    _fp8_weight("w_gate_up", w_gate_up, "w_gate_up_scale", w_gate_up_scale)
    _fp8_weight("w_down", w_down, "w_down_scale", w_down_scale)
    _tensor("weights", weights, 2)
    _same_device("x", x, weights=weights, ids=ids, w_gate_up=w_gate_up, w_gate_up_scale=w_gate_up_scale,
                 w_down=w_down, w_down_scale=w_down_scale)
    _expert_layer_shapes(x, weights, ids, w_gate_up, w_down, check_ids=True)
    return dict(x=x, weights=weights, ids=ids, w_gate_up=w_gate_up, w_gate_up_scale=w_gate_up_scale, w_down=w_down,
                w_down_scale=w_down_scale)

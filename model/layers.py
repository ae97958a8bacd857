"""The blocks of the Qwen3.5-MoE text decoder, as transformers defines them (modeling_qwen3_5_moe.py).

Every token mixer and expert call goes through the lab's ops (`kernellab`), with the backend chosen at load:
`ops.gated_delta_rule`, `ops.attention`, `ops.route`, `ops.moe` are model.model.trusted(op, backend): the
backend's implementation, looked up once, called with every keyword in kernellab.validate's normalised form
(kernellab.get's checked call where gradients are needed).
Shapes: B batch, T new tokens, D hidden size. On several processes (a model.parallel.Layout) each layer holds
this rank's heads and experts only (model/parallel.py); without one, the whole layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kernellab.validate import LOG_DECAY_MIN, default_state_dtype
from model.config import ModelConfig
from model.parallel import Layout

CONV_TILE = 64  # time steps per tile of the causal conv (64 x 2048 channels x 4 bytes: 0.5 MB)


# Up to this many rows (decode), Linear streams its weight once through _gemv; more (prefill) take oneDNN's GEMM.
GEMV_ROWS = 8


@numba.njit(fastmath=True, nogil=True, cache=True)
def _gemv(x, w, y):
    """y [m, N] = x [m, K] @ w [N, K]^T (float32, contiguous), one weight row at a time against every row of x: the
    weight is read once, in order, by a dot-product loop LLVM vectorises. On one core of this host's AMD EPYC it
    streams the weight at ~1.5x the bandwidth of MKL's sgemv (10-15 against 7-10 GB/s, ~17 for a plain sum), and a
    decode step is those reads."""
    m, k = x.shape
    for i in range(w.shape[0]):
        for r in range(m):
            acc = np.float32(0.0)
            for j in range(k):
                acc += w[i, j] * x[r, j]
            y[r, i] = acc


class Linear(nn.Linear):
    """nn.Linear (the same parameters and state dict) on the fastest CPU path for float32 inference on one thread
    (torch.get_num_threads() == 1), outside autograd; x [..., in_features] -> [..., out_features]:
    - up to GEMV_ROWS rows (decode): _gemv on the weight itself;
    - more rows (prefill): oneDNN's GEMM (torch.ops.mkldnn._linear_pointwise, as inductor calls it) on a copy of
      the weight packed once for it, ~1.2-2x MKL's sgemm on one core (float32 products and sums, relative error
      ~1e-6). The copy costs the weight's memory once more, and is remade whenever the weight is another tensor,
      was written in place since (its version counter) or holds other storage (`weight.data = ...`, as
      Module.to / half / float assign, keeps the Parameter and its version): never stale. An inference tensor has no version
      counter: F.linear (from_pretrained's weights never are one, even when loaded under inference_mode).
    Everything else (gradients, other dtypes or devices, several threads) is F.linear, as nn.Linear."""

    _packed = None  # (weight, its version when packed, its data then, the oneDNN copy)

    def forward(self, x):
        w = self.weight
        if (torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32
                or torch.get_num_threads() != 1 or x.shape[-1] != w.shape[1]):  # (F.linear refuses a wrong shape)
            return F.linear(x, w, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= GEMV_ROWS:
            rows = rows.contiguous()
            y = rows.new_empty(rows.shape[0], w.shape[0])
            _gemv(rows.numpy(), w.detach().numpy(), y.numpy())
            y = y.view(*x.shape[:-1], w.shape[0])
            return y if self.bias is None else y.add_(self.bias)
        if w.is_inference():  # no version counter to tell a write: unpacked
            return F.linear(x, w, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._pack(), self.bias, "none", [], "")

    def _pack(self):
        w = self.weight
        # the storage packed is held (w.detach()), so that no new storage can take its address
        if self._packed is None or self._packed[0] is not w or self._packed[1] != w._version or \
                self._packed[2].data_ptr() != w.data_ptr():
            self._packed = (w, w._version, w.detach(), torch.ops.mkldnn._reorder_linear_weight(w.detach()))
        return self._packed[3]


def rms(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) (times weight) over the last dim, in float32: torch's fused rms_norm, one pass
    instead of five."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight, eps)


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: rms(x) * (1 + weight) in float32. x [..., dim]."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        return rms(x, self.eps, 1.0 + self.weight.float()).type_as(x)


class GatedRMSNorm(nn.Module):
    """weight * rms(x) * silu(gate), per value head (not zero-centred). x, gate [..., dim]."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, gate):
        return (self.weight * rms(x, self.eps).to(x.dtype)).mul_(F.silu(gate.float())).to(x.dtype)


@dataclass
class Step:
    """Where the T new tokens of one forward call sit; made once per call (Qwen35Moe.step), read by every layer.

    rope:        (cos, sin) [B or 1, T, rotary_dim] float32 at each token's position.
    cu_seqlens:  None, or int32 [N + 1]: the tokens are N packed sequences (B = 1), new ones (row n of a cache
                 receives sequence n).
    positions:   int64 [B, T] (or [1, T] packed: the position within its sequence) of each new token.
    rows:        None, or int64 [T]: the sequence of each packed token (cu_seqlens only).
    kv_lens:     None (no cache, or a fresh one), or int32 [B]: each row's tokens once these are written.
    window:      keys read from the KV buffers (the longest row's, or the whole buffer for static shapes).
    fresh:       the cache holds no token of these rows yet: attention runs over the new tokens alone.
    slots:       None (the call's rows are cache rows 0..B-1), or int32 [B] (N packed): the cache's pool rows
                 they are (Cache.use); first_slot: the first of them when they are consecutive (a view of KV).
    record:      with slots: None; "verify" (the Gated DeltaNet states after every token, the pool and conv
                 states left for Cache.commit); an int C (the states every C tokens, for a prefix cache).
    kept:        with record: one Recorded per Gated DeltaNet layer, in layer order.
    """

    rope: tuple
    cu_seqlens: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    kv_lens: torch.Tensor | None = None
    window: int = 0
    fresh: bool = True
    slots: torch.Tensor | None = None
    first_slot: int | None = None
    record: str | int | None = None
    kept: list | None = None

    def kv(self, buffer: torch.Tensor, B: int) -> torch.Tensor:
        """The first `window` positions of the call's B rows of a KV buffer [P, max_len, Hkv, Dh]: a view of rows
        0..B-1 or of consecutive slots, else a gather of the slots' rows (kernellab.attention takes no row index)."""
        if self.slots is None or self.first_slot is not None:
            start = self.first_slot or 0
            return buffer[start:start + B, :self.window]
        return buffer[self.slots, :self.window]


@dataclass
class LinearAttentionState:
    """Cache of a Gated DeltaNet layer, allocated once: the last (kernel - 1) conv inputs [B, C, kernel - 1] and
    the recurrent state [B, Hv, K, V] (float32), both updated in place. Its size does not grow with the context."""

    conv: torch.Tensor
    recurrent: torch.Tensor


@dataclass
class Recorded:
    """What a recording call (Step.record) keeps of one Gated DeltaNet layer: its state, the conv window
    [B, kernel - 1 + T, C] (previous inputs, then the call's: the conv state after t tokens is window[:, t:t +
    kernel - 1]) and the op's StateTrace."""

    state: LinearAttentionState
    window: torch.Tensor
    trace: object = None


@dataclass
class KVState:
    """Cache of an attention layer: key and value buffers [B, max_len, Hkv, Dh], allocated once; a call writes its
    tokens at their positions."""

    k: torch.Tensor
    v: torch.Tensor

    def write(self, k, v, step: Step):
        """Writes k, v [B, T, Hkv, Dh] (packed: [1, T, ...] into each token's row) at their positions."""
        if step.rows is not None:
            self.k.index_put_((step.rows, step.positions[0]), k[0])
            self.v.index_put_((step.rows, step.positions[0]), v[0])
            return
        B = k.shape[0]
        rows = (torch.arange(B, device=k.device) if step.slots is None else step.slots.long())[:, None]
        self.k.index_put_((rows, step.positions), k)
        self.v.index_put_((rows, step.positions), v)


class GatedDeltaNet(nn.Module):
    """Linear attention with the gated delta rule.

    x [B, T, D] -> in_proj -> [q k v | z | b | a]; q k v through a causal depthwise conv1d + SiLU;
    q, k [B, T, Hk, K] (l2-normalised in the kernel), v [B, T, Hv, V]; g = -exp(A_log) softplus(a + dt_bias),
    beta = sigmoid(b); o = gated_delta_rule(...) [B, T, Hv, V]; gated RMSNorm with z; out_proj -> [B, T, D].
    With a layout: Hk, Hv are this rank's key and value heads (Layout.heads), the states hold those, and
    out_proj's partial sums are added over the TP group."""

    def __init__(self, cfg: ModelConfig, ops, layout: Layout | None = None):
        super().__init__()
        self.ops, self.layout = ops, layout
        self.Hk, self.Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        if layout is not None:
            values, keys = layout.heads(self.Hv, self.Hk)
            self.Hk, self.Hv = len(keys), len(values)
        self.K, self.V = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = self.Hk * self.K, self.Hv * self.V
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel_size = cfg.linear_conv_kernel_dim
        # transformers' in_proj_qkv, in_proj_z, in_proj_b, in_proj_a stacked: one GEMM
        self.in_proj = Linear(cfg.hidden_size, self.conv_dim + self.value_dim + 2 * self.Hv, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel_size, groups=self.conv_dim, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.Hv))
        self.dt_bias = nn.Parameter(torch.ones(self.Hv))
        self.norm = GatedRMSNorm(self.V, cfg.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, cfg.hidden_size, bias=False)

    state_dtype = None  # the recurrent state's dtype in the cache (None: float32); Qwen35Moe sets it at load

    def new_state(self, batch: int, dtype, device) -> LinearAttentionState:
        return LinearAttentionState(
            conv=torch.zeros(batch, self.conv_dim, self.kernel_size - 1, dtype=dtype, device=device),
            recurrent=torch.zeros(batch, self.Hv, self.K, self.V, dtype=self.state_dtype or torch.float32,
                                  device=device))

    def causal_conv(self, x, state: LinearAttentionState | None, step: Step | None):
        """Depthwise causal conv1d + SiLU over time. x [B, T, C] -> [B, T, C]; updates state.conv in place.
        Computed as kernel_size shifted multiply-adds on the time-major layout: no transposes of x, and several
        times faster on CPU than conv1d's depthwise path. Packed sequences (step.cu_seqlens) start from zero
        history each: a tap that reaches before its token's sequence is masked."""
        B, T, C = x.shape
        history = self.kernel_size - 1
        if T == 1 and state is not None and step is not None and not step.fresh and step.cu_seqlens is None \
                and step.slots is None and step.record is None and not torch.is_grad_enabled():  # decode: one tap-weighted sum over the window, three ops
            window = torch.cat([state.conv[:B], x.transpose(1, 2)], dim=2)  # [B, C, kernel]
            state.conv[:B].copy_(window[:, :, 1:])
            return F.silu(window.mul_(self.conv1d.weight[:, 0]).sum(-1)[:, None])
        weight = self.conv1d.weight[:, 0].t().contiguous()  # [kernel, C]: contiguous rows vectorise
        packed = step is not None and step.cu_seqlens is not None
        fresh = state is None or step is None or step.fresh
        past = x.new_zeros(B, history, C) if fresh else _rows(state.conv, B, step).transpose(1, 2)
        window = torch.cat([past, x], dim=1)  # [B, history + T, C]: the previous inputs stand in for zero padding
        if state is not None:
            self._save_conv(state, window, step)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            # training: the same sum in differentiable ops (out= and in-place writes into a buffer have no backward)
            out = window[:, history:] * weight[history]
            for i in range(history):
                tap = weight[i] * (step.positions[0, :, None] >= history - i) if packed else weight[i]
                out = out + window[:, i:i + T] * tap
            return F.silu(out)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        for start in range(0, T, CONV_TILE):  # tiles of time steps, so that each tile's passes hit the cache
            end = min(start + CONV_TILE, T)
            tile = torch.mul(window[:, start + history:end + history], weight[history], out=out[:, start:end])
            for i in range(history):
                tap = weight[i]
                if packed:  # the tap reads `history - i` steps back: only tokens that far into their sequence
                    tap = tap * (step.positions[0, start:end, None] >= history - i)
                tile.addcmul_(window[:, start + i:end + i], tap)
            F.silu(tile, inplace=True)
        return out

    def _save_conv(self, state: LinearAttentionState, window, step: Step | None):
        """state.conv rows <- the last kernel - 1 inputs of each sequence (zero before a packed one's start)."""
        history = self.kernel_size - 1
        if step is not None and step.record is not None:
            step.kept.append(Recorded(state, window))
            if step.record == "verify":  # the conv states of the accepted tokens: Cache.commit
                return
        if step is None or step.cu_seqlens is None:
            B, T = window.shape[0], window.shape[1] - history
            _write_rows(state.conv, window[:, T:].transpose(1, 2), step)
            return
        cu = step.cu_seqlens.to(torch.int64)
        index = cu[1:, None] + torch.arange(history, device=cu.device)  # [N, history] into the window
        taken = window[0][index] * (index >= cu[:-1, None] + history)[..., None]  # [N, history, C]
        _write_rows(state.conv, taken.transpose(1, 2), step)

    def forward(self, x, step: Step | None = None, state: LinearAttentionState | None = None):
        B, T, _ = x.shape
        qkv, z, b, a = self.in_proj(x).split([self.conv_dim, self.value_dim, self.Hv, self.Hv], dim=-1)
        qkv = self.causal_conv(qkv, state, step)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        # float32: exp(A_log) overflows fp16; floored at LOG_DECAY_MIN as kernellab.validate does (ops are trusted)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        cu_seqlens = None if step is None else step.cu_seqlens
        rows = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        # decode (one token, a state to continue) runs token by token; everything else chunked
        mode = "recurrent" if T == 1 and state is not None else "chunk"
        q, k, v = q.reshape(B, T, self.Hk, self.K), k.reshape(B, T, self.Hk, self.K), v.reshape(B, T, self.Hv, self.V)
        g, beta = g.clamp(min=LOG_DECAY_MIN), b.sigmoid()
        if step is not None and step.slots is not None:
            o = self._pooled(q, k, v, g, beta, state, step, mode)
        else:
            initial = None if state is None or step is None or step.fresh else state.recurrent[:rows]
            o, final = self.ops.gated_delta_rule(
                q=q, k=k, v=v, g=g, beta=beta, scale=self.K ** -0.5, initial_state=initial,
                output_final_state=state is not None, use_qk_l2norm=True, cu_seqlens=cu_seqlens, mode=mode,
                state_dtype=self.state_dtype or default_state_dtype(v))
            if state is not None:
                state.recurrent[:rows].copy_(final)
        o = self.norm(o, z.reshape(B, T, self.Hv, self.V))
        out = self.out_proj(o.reshape(B, T, self.value_dim))
        return out if self.layout is None else self.layout.reduce(out)


    def _pooled(self, q, k, v, g, beta, state: LinearAttentionState, step: Step, mode: str):
        """The gated delta rule on the pool: each sequence reads its slot's state and writes its final one back in
        place (state_indices); no other row is read or copied. A verify (record "verify") runs the token loop,
        leaves the pool as it was and keeps the state after every token; record C keeps those every C tokens."""
        record = {} if step.record is None else {"output_intermediate_states": True} if step.record == "verify" \
            else {"chunk_states_every": step.record}
        if step.record == "verify":
            mode = "recurrent"  # the token loop of a decode step: a verify of T tokens is T decode steps
        out = self.ops.gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, scale=self.K ** -0.5,
                                        initial_state=state.recurrent, output_final_state=False, use_qk_l2norm=True,
                                        cu_seqlens=step.cu_seqlens, mode=mode,
                                        state_dtype=self.state_dtype or default_state_dtype(v),
                                        state_indices=step.slots, **record)
        if record:
            step.kept[-1].trace = out[2]
        return out[0]


def _rows(buffer: torch.Tensor, B: int, step: Step | None) -> torch.Tensor:
    """The call's B rows of a cache buffer [P, ...]: rows 0..B-1, or the step's slots."""
    return buffer[:B] if step is None or step.slots is None else buffer[step.slots]


def _write_rows(buffer: torch.Tensor, rows: torch.Tensor, step: Step | None) -> None:
    """buffer's rows of the call (0..B-1, or the step's slots) <- rows [B, ...], in place."""
    if step is None or step.slots is None:
        buffer[:rows.shape[0]].copy_(rows)
    else:
        buffer.index_copy_(0, step.slots.long(), rows.to(buffer.dtype))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    """Gated softmax attention with grouped KV heads.

    x [B, T, D] -> q_proj gives [q | gate] per head; q, k [.., Dh] get a zero-centred RMSNorm and rotary
    embedding on their first rotary_dim dims; o = attention(q, k, v) [B, T, Hq, Dh] (packed sequences by
    cu_seqlens; against the cache's KV buffers by kv_lens); o * sigmoid(gate); o_proj -> [B, T, D].
    With a layout: Hq, Hkv are this rank's query heads and the KV heads they read (Layout.heads: KV heads
    replicated when there are fewer than the TP group's ranks), the KV buffers hold those, and o_proj's partial
    sums are added over the TP group (its bias once, after)."""

    def __init__(self, cfg: ModelConfig, ops, layout: Layout | None = None):
        super().__init__()
        self.ops, self.layout = ops, layout
        self.Hq, self.Hkv, self.Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if layout is not None:
            queries, kv = layout.heads(self.Hq, self.Hkv)
            self.Hq, self.Hkv = len(queries), len(kv)
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, 2 * self.Hq * self.Dh, bias=bias)
        self.k_proj = Linear(cfg.hidden_size, self.Hkv * self.Dh, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, self.Hkv * self.Dh, bias=bias)
        self.o_proj = Linear(self.Hq * self.Dh, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.Dh, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.Dh, cfg.rms_norm_eps)

    def new_state(self, batch: int, max_len: int, dtype, device) -> KVState:
        shape = (batch, max_len, self.Hkv, self.Dh)
        return KVState(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def forward(self, x, step: Step, state: KVState | None = None):
        B, T, _ = x.shape
        q, gate = self.q_proj(x).view(B, T, self.Hq, 2 * self.Dh).chunk(2, dim=-1)
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(x).view(B, T, self.Hkv, self.Dh))
        v = self.v_proj(x).view(B, T, self.Hkv, self.Dh)
        q, k = apply_rope(q, *step.rope), apply_rope(k, *step.rope)
        if state is not None:
            state.write(k, v, step)
        if state is None or step.fresh:  # nothing before these tokens: attend over them alone
            o = self.ops.attention(q=q, k=k, v=v, causal=True, scale=self.Dh ** -0.5, cu_seqlens=step.cu_seqlens,
                                   kv_lens=None)
        else:
            o = self.ops.attention(q=q, k=step.kv(state.k, B), v=step.kv(state.v, B), causal=True,
                                   scale=self.Dh ** -0.5, cu_seqlens=None, kv_lens=step.kv_lens)
        o = o.reshape(B, T, self.Hq * self.Dh) * torch.sigmoid(gate.reshape(B, T, -1))
        if self.layout is None or self.layout.tp == 1:
            return self.o_proj(o)
        out = self.layout.reduce(F.linear(o, self.o_proj.weight))
        return out if self.o_proj.bias is None else out + self.o_proj.bias


def apply_rope(x, cos, sin):
    """Rotary embedding of the first rotary_dim dims of x [B, T, H, Dh]; cos, sin [B or 1, T, rotary_dim]."""
    rot = cos.shape[-1]
    cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


class Experts(nn.Module):
    """E experts stored fused, as transformers does: gate_up_proj [E, 2I, D], down_proj [E, D, I] (this rank's
    E / ep with a layout); after quantize_fp8, float8_e4m3fn buffers with their 128 x 128 block scales
    gate_up_proj_scale, down_proj_scale."""

    fp8 = False

    def __init__(self, cfg: ModelConfig, layout: Layout | None = None):
        super().__init__()
        E, I, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        if layout is not None:
            E = len(layout.experts(E))
        self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.zeros(E, D, I))

    def quantize_fp8(self):
        """The weights in float8_e4m3fn with block scales (kernellab.fp8.quantize_weights), for ops.moe_fp8."""
        from kernellab.fp8 import quantize_weights

        for name in ("gate_up_proj", "down_proj"):
            q, scale = quantize_weights(getattr(self, name).data)
            delattr(self, name)
            self.register_buffer(name, q)
            self.register_buffer(f"{name}_scale", scale)
        self.fp8 = True


class SharedExpert(nn.Module):
    """A SwiGLU MLP whose gate and up projections are stacked: gate_up_proj [2I, D], down_proj [D, I]."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SparseMoe(nn.Module):
    """x [N, D] -> top_k of E routed experts (softmax router, renormalised weights) plus a shared expert
    scaled by sigmoid(shared_expert_gate(x)) -> [N, D]. With a layout: this rank's rows (Layout.rows) through
    the replicated router and shared expert and the experts of its EP group (ops.moe is then moe_ep's call), then
    every rank's rows gathered."""

    def __init__(self, cfg: ModelConfig, ops, layout: Layout | None = None):
        super().__init__()
        self.ops, self.layout = ops, layout
        self.top_k = cfg.num_experts_per_tok
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = Experts(cfg, layout)
        self.shared_expert = SharedExpert(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x):
        if self.layout is None:
            return self.mix(x)
        return self.layout.gather(self.mix(x[self.layout.rows(x.shape[0])]), x.shape[0])

    def mix(self, x):
        """The layer on the rows x [n, D] -> [n, D]."""
        weights, ids = self.ops.route(router_logits=self.gate(x), top_k=self.top_k, renormalize=True)
        experts = self.experts
        if experts.fp8:
            routed = self.ops.moe_fp8(x=x, weights=weights, ids=ids, w_gate_up=experts.gate_up_proj,
                                      w_gate_up_scale=experts.gate_up_proj_scale, w_down=experts.down_proj,
                                      w_down_scale=experts.down_proj_scale)
        else:
            routed = self.ops.moe(x=x, weights=weights, ids=ids, w_gate_up=experts.gate_up_proj,
                                  w_down=experts.down_proj)
        return routed + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class DecoderLayer(nn.Module):
    """x + mixer(norm(x)), then + moe(norm(x)); the mixer is a GatedDeltaNet or an Attention layer."""

    def __init__(self, cfg: ModelConfig, kind: str, ops, layout: Layout | None = None):
        super().__init__()
        self.kind = kind
        if kind == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg, ops, layout)
        else:
            self.self_attn = Attention(cfg, ops, layout)
        self.mlp = SparseMoe(cfg, ops, layout)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, step: Step, state=None):
        h = self.input_layernorm(x)
        if self.kind == "linear_attention":
            x = x + self.linear_attn(h, step, state)
        else:
            x = x + self.self_attn(h, step, state)
        B, T, D = x.shape
        return x + self.mlp(self.post_attention_layernorm(x).reshape(B * T, D)).reshape(B, T, D)

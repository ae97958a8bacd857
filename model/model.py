"""The Qwen3.5-MoE text decoder: embeddings, the layer stack of `layer_types`, final norm, LM head;
a cache (conv + recurrent state per Gated DeltaNet layer, KV per attention layer) and greedy decoding."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

import kernels
from kernels import registry
from kernels.validate import STORED_STATE_DTYPES
from model.config import ModelConfig
from model.layers import DecoderLayer, RMSNorm
from model.weights import read_checkpoint, to_lab_state_dict

OPS = ("gated_delta_rule", "attention", "route", "moe")


def resolve_backends(backend: str | dict, device, ops: tuple[str, ...] = OPS) -> dict[str, str]:
    """Backend name per op of `ops`. A name applies to every op that has a backend of that name ("auto"
    elsewhere); a dict {op: name} picks per op. "auto" resolves to the name it stands for on `device`."""
    if isinstance(backend, dict):
        unknown = set(backend) - set(ops)
        if unknown:
            raise ValueError(f"backend: unknown op(s) {sorted(unknown)}; the model uses {ops}")
        names = {op: backend.get(op, "auto") for op in ops}
    else:
        if backend != "auto" and not any(backend in registry.registered(op) for op in ops):
            raise ValueError(f"backend {backend!r} is not registered for any of {ops}")
        names = {op: backend if backend in registry.registered(op) else "auto" for op in ops}
    return {op: registry.auto_backend(op, device) if name == "auto" else name for op, name in names.items()}


class Cache:
    """Per layer: a LinearAttentionState or a KVState; `position` = tokens seen so far."""

    def __init__(self, states: list):
        self.states = states
        self.position = 0

    def nbytes(self) -> int:
        """Bytes of every cache tensor (conv and recurrent states, keys and values)."""
        return sum(t.numel() * t.element_size() for s in self.states for t in vars(s).values())


class Qwen35Moe(nn.Module):
    """input_ids [B, T] -> logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig, backends: dict[str, str], state_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg
        self.backends = backends
        ops = SimpleNamespace(**{op: kernels.get(op, name) for op, name in backends.items()})
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, kind, ops) for kind in cfg.layer_types)
        for layer in self.layers:
            if layer.kind == "linear_attention":
                layer.linear_attn.state_dtype = state_dtype
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def rope(self, start: int, length: int):
        """cos, sin [length, rotary_dim] (float32) of positions start..start+length (as transformers computes)."""
        dim, device = self.config.rotary_dim, self.embed_tokens.weight.device
        inv_freq = 1.0 / self.config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim)
        positions = torch.arange(start, start + length, device=device, dtype=torch.float)
        freqs = positions[:, None] * inv_freq
        freqs = torch.cat([freqs, freqs], dim=-1)
        return freqs.cos(), freqs.sin()

    def new_cache(self, batch: int, max_len: int) -> Cache:
        """An empty cache for `batch` sequences of up to `max_len` tokens."""
        dtype, device = self.embed_tokens.weight.dtype, self.embed_tokens.weight.device
        return Cache([layer.linear_attn.new_state(batch, dtype, device) if layer.kind == "linear_attention"
                      else layer.self_attn.new_state(batch, max_len, dtype, device) for layer in self.layers])

    def hidden_states(self, input_ids, cache: Cache | None = None):
        """input_ids [B, T] -> final-norm hidden states [B, T, D]; continues and advances `cache` when given."""
        start = 0 if cache is None else cache.position
        x = self.embed_tokens(input_ids)
        rope = self.rope(start, input_ids.shape[1])
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, start, None if cache is None else cache.states[i])
        if cache is not None:
            cache.position += input_ids.shape[1]
        return self.norm(x)

    @torch.inference_mode()
    def forward(self, input_ids, cache: Cache | None = None):
        return self.lm_head(self.hidden_states(input_ids, cache))

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens: int):
        """Greedy decoding: one chunked prefill, then one token at a time. input_ids [B, T] -> [B, T + new]."""
        B, T = input_ids.shape
        if max_new_tokens <= 0:
            return input_ids
        cache = self.new_cache(B, T + max_new_tokens)
        last = self.hidden_states(input_ids, cache)[:, -1:]  # only the last position's logits are needed
        tokens = [input_ids]
        for step in range(max_new_tokens):
            next_token = self.lm_head(last).argmax(-1)  # [B, 1]
            tokens.append(next_token)
            if step + 1 < max_new_tokens:
                last = self.hidden_states(next_token, cache)
        return torch.cat(tokens, dim=1)


def from_pretrained(path: str | Path, backend: str | dict = "auto", dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None, state_dtype: torch.dtype | str | None = None,
                    fp8_experts: bool = False) -> Qwen35Moe:
    """Load a Hugging Face Qwen3.5-MoE text checkpoint folder (config.json + safetensors).

    backend: a backend name for every op that has it, or {op: name} (ops: gated_delta_rule, attention,
    route, moe; moe_fp8 with fp8_experts). dtype: None keeps the checkpoint's. device: default cpu.
    state_dtype: the Gated DeltaNet layers' recurrent state in the cache (float32, bfloat16, float16; None:
    float32), as the gated delta rule's state_dtype. fp8_experts: the routed experts' weights quantized to
    float8_e4m3fn with 128 x 128 block scales at load, run by moe_fp8."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    device = torch.device(device or "cpu")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    state_dtype = getattr(torch, state_dtype, state_dtype) if isinstance(state_dtype, str) else state_dtype
    if state_dtype is not None and state_dtype not in STORED_STATE_DTYPES:
        raise ValueError(f"state_dtype must be None or one of float32, bfloat16, float16, got {state_dtype!r}")
    cfg = ModelConfig.from_folder(path)
    tensors = read_checkpoint(path, cfg, dtype=dtype, device=device)
    if dtype is None:
        dtype = tensors["model.embed_tokens.weight"].dtype
    ops = OPS + (("moe_fp8",) if fp8_experts else ())
    with torch.device("meta"):  # no memory until the checkpoint's tensors are assigned
        m = Qwen35Moe(cfg, resolve_backends(backend, device, ops), state_dtype)
    m.load_state_dict({k: v.to(dtype) for k, v in to_lab_state_dict(tensors, cfg).items()}, strict=True, assign=True)
    if fp8_experts:
        for layer in m.layers:
            layer.mlp.experts.quantize_fp8()
    return m.eval()

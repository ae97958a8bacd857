"""The bytes a decode step moves and the floor they set at the measured copy bandwidth; cache memory against context."""
from __future__ import annotations

import model
from bench import timing
from bench.suites.model.config import MEMORY_CONTEXTS


def cache_bytes_from_shapes(cfg: model.ModelConfig, batch: int, context: int, dtype_bytes: int,
                            state_bytes: int = 4) -> int:
    """Bytes of the cache at `context` tokens, from the config alone: per Gated DeltaNet layer the conv
    state [B, C, kernel - 1] (model dtype) and the recurrent state [B, Hv, K, V] (state_bytes per element: 4,
    float32, unless the model stores another state_dtype); per attention layer keys and values
    [B, context, Hkv, Dh]."""
    conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + cfg.linear_num_value_heads * \
        cfg.linear_value_head_dim
    linear = batch * (conv_dim * (cfg.linear_conv_kernel_dim - 1) * dtype_bytes + cfg.linear_num_value_heads *
                      cfg.linear_key_head_dim * cfg.linear_value_head_dim * state_bytes)
    full = 2 * batch * context * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes
    return sum(linear if kind == "linear_attention" else full for kind in cfg.layer_types)


def decode_step_bytes(m: model.Qwen35Moe, context: int) -> dict[str, int]:
    """Bytes one decode step of one sequence at `context` tokens must move, by part: "weights" (every dense
    parameter once: projections, norms, router, shared expert, LM head; one row of the embedding), "experts"
    (top_k of the E experts of each layer), "states" (each Gated DeltaNet layer's recurrent and conv state, read
    and written), "kv" (each attention layer's keys and values at `context` positions)."""
    cfg = m.config
    weights = experts = 0
    for name, p in m.named_parameters():  # a tied LM head is the embedding: named once
        size = p.numel() * p.element_size()
        if name.startswith("embed_tokens."):
            size = size // cfg.vocab_size * (cfg.vocab_size if cfg.tie_word_embeddings else 1)
        if ".experts." in name:
            experts += size * cfg.num_experts_per_tok // cfg.num_experts
        else:
            weights += size
    dtype_bytes = m.embed_tokens.weight.element_size()
    linear = sum(kind == "linear_attention" for kind in cfg.layer_types)
    states = 2 * (cache_bytes_from_shapes(cfg, 1, 0, dtype_bytes) if linear else 0)
    kv = cache_bytes_from_shapes(cfg, 1, context, dtype_bytes) - states // 2
    return dict(weights=weights, experts=experts, states=states, kv=kv)


def floor_rows(rows, paths, device, dtype) -> None:
    """Adds to every decode row its step's bytes by part (decode_step_bytes: *_bytes, step_bytes), the copy
    bandwidth of a working set that size (floor_gbps, measured now, once per size), the floor (floor_ms = bytes /
    bandwidth) and x_floor = median / floor."""
    gbps = {}
    for variant, path in paths.items():
        m = model.from_pretrained(path, backend="reference", dtype=dtype, device=device)
        for row in rows:
            if row.get("phase") != "decode" or row["variant"] != variant or row.get("error"):
                continue
            parts = decode_step_bytes(m, int(row["context"]))
            total = sum(parts.values())
            if total not in gbps:
                gbps[total] = timing.copy_gbps(device, budget_s=0.3, nbytes=total)
            row.update({f"{part}_bytes": n for part, n in parts.items()}, step_bytes=total, floor_gbps=gbps[total],
                       floor_ms=total / (gbps[total] * 1e9) * 1e3)
            row["x_floor"] = row["median_ms"] / row["floor_ms"]


def memory_rows(paths, device, dtype):
    """Cache bytes against context, measured on allocated caches (zero pages: nothing is touched) and, for
    the real Qwen3.5-35B-A3B shape, computed from the config."""
    rows = []
    for variant, path in paths.items():
        m = model.from_pretrained(path, backend="reference", dtype=dtype, device=device)
        for context in MEMORY_CONTEXTS:
            measured = m.new_cache(1, context).nbytes()
            assert measured == cache_bytes_from_shapes(m.config, 1, context, m.embed_tokens.weight.element_size())
            rows.append(dict(op="model", backend="any", device=device, dtype=str(dtype).removeprefix("torch."),
                             shape="bench config", context=context, phase="cache", variant=variant,
                             cache_bytes=measured, how="measured"))
    real = model.ModelConfig()  # transformers' defaults are Qwen3.5-35B-A3B
    for variant, cfg in {"hybrid": real, "all_attention": model.ModelConfig(
            num_hidden_layers=real.num_hidden_layers, layer_types=("full_attention",) * real.num_hidden_layers)}.items():
        for context in MEMORY_CONTEXTS:
            rows.append(dict(op="model", backend="any", device=device, dtype="bfloat16", shape="Qwen3.5-35B-A3B",
                             context=context, phase="cache", variant=variant,
                             cache_bytes=cache_bytes_from_shapes(cfg, 1, context, 2), how="computed from shapes"))
    return rows

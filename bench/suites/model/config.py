"""The bench checkpoint's shape, the contexts and budgets of the model sweep, and the labels of its rows."""
from __future__ import annotations

import math
from pathlib import Path

import torch

# Qwen3.5-35B-A3B's proportions at a quarter of its width, so a 2-core CPU runs 2K-token prefills: Gated
# DeltaNet key dim = hidden, value dim = 2 x hidden (Hv = 2 Hk, head dim 128); attention queries 2 x hidden
# (head dim 256, rotary on a quarter; 4 query heads per KV head where the real model has 8); 3 linear : 1 full.
BENCH_CONFIG = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=8, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=256, linear_num_key_heads=4, linear_num_value_heads=8,
                    linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                    num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128,
                    shared_expert_intermediate_size=128, max_position_embeddings=262144, tie_word_embeddings=False)


# Decode steps are timed on caches filled to each context (model.cache.fill: no prefill of that many tokens);
# prefill is timed at a few contexts only (its time per token barely changes for the hybrid, and the all-attention
# twin's quadratic part shows at three). On CPU 1 thread, the whole sweep plans to under 20 minutes (plan()).
DECODE_CONTEXTS = {"cpu": (512, 1024, 2048, 4096, 8192, 16384, 32768),
                   "cuda": (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)}
PREFILL_CONTEXTS = {"cpu": (512, 2048, 8192), "cuda": (2048, 8192, 32768)}
BF16_CONTEXTS = (2048,)  # the bf16 comparison with vLLM's engine (CPU): its targets' context
QUICK_DECODE_CONTEXTS = (128, 512)
QUICK_PREFILL_CONTEXTS = (128,)
MEMORY_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
MAX_DECODE_STEPS = 256  # room in a prefilled cache for the timed decode steps (llama.cpp's and transformers' grow)
WARMUP_CONTEXT = 64  # each runner's first prefill and decode (compilation, autotuning) at this length, untimed
# Training steps (forward, backward, AdamW step) on one sequence of this many tokens, the hybrid only: the issue's
# target is training tokens/s on 2K-token sequences.
TRAIN_CONTEXT = 2048
QUICK_TRAIN_CONTEXT = 64
TRAIN_LR = 1e-4  # small: the timed steps must not drive the random checkpoint's loss to NaN
# A 2K-token step takes seconds on a CPU: with this budget, steps up to ~16 s get bench.timing's 3 repeats.
TRAIN_BUDGET_S = 10.0
BUDGET_S = {True: 0.5, False: 2.0}  # a prefill's timing budget by quick; a decode context gets a quarter

# The plan's time model, bench checkpoint, 1 thread (the rows of reports/cpu/intel-xeon: prefill about 0.9 ms per
# token for the hybrid, the twin's 6 more attention layers 1.1 s more at 2K, a decode step 25-45 ms); a GPU's are
# guesses 100x smaller. Seconds per prefill token, per squared token per full-attention layer, per decode step, and
# per runner's process (start, imports, load, warm-up); engine_s: vLLM's engine's start on top (its processes,
# torch.compile of the model, its warm-up; CPU only).
COST = {"cpu": dict(token_s=9e-4, attention_s=4e-8, step_s=0.04, process_s=10.0, engine_s=120.0),
        "cuda": dict(token_s=9e-6, attention_s=4e-10, step_s=4e-4, process_s=20.0, engine_s=0.0)}


def shape_label(cfg) -> str:
    """e.g. "B1 D512 L8(6 GDN + 2 ATT) E32k4 GDN(4,8)x128 ATT(4,1)x256"."""
    linear = sum(kind == "linear_attention" for kind in cfg.layer_types)
    return (f"B1 D{cfg.hidden_size} L{cfg.num_hidden_layers}({linear} GDN + {cfg.num_hidden_layers - linear} ATT) "
            f"E{cfg.num_experts}k{cfg.num_experts_per_tok} "
            f"GDN({cfg.linear_num_key_heads},{cfg.linear_num_value_heads})x{cfg.linear_key_head_dim} "
            f"ATT({cfg.num_attention_heads},{cfg.num_key_value_heads})x{cfg.head_dim}")


def _params(path) -> int:
    """Number of parameters stored in a checkpoint folder."""
    from safetensors import safe_open

    total = 0
    for file in Path(path).glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def model_dtype(device: str) -> torch.dtype:
    """The model's dtype in the benchmark: float32 on CPU, bfloat16 on a GPU."""
    return torch.float32 if device == "cpu" else torch.bfloat16

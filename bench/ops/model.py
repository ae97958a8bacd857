"""The Qwen3.5-MoE model's prefill, decode and training (bench/model.py): a sweep of its own, on the backends of the
ops it runs."""
from bench.ops import OpSpec, Target

# The Qwen3.5-MoE model's prefill and decode (bench/model.py), on the backends of the ops it runs.
MODEL = OpSpec("model", sweep="bench.model:sweep", backend_ops=("gated_delta_rule", "attention", "route", "moe"),
               summary="bench.model:summary",
               targets=(Target("Model training (forward, backward, AdamW step) on 2K-token sequences, bench checkpoint "
                               "(CPU, float32): at least 5x the tokens/s of transformers' Qwen3_5MoeForCausalLM",
                               "peer", 5.0, dict(phase="train", context=2048, variant="hybrid", device="cpu",
                                                 dtype="float32"), peer="transformers"),))


SPECS = (MODEL,)

"""The Qwen3.5-MoE model's prefill, decode and training (bench/suites/model/): a sweep of its own, on the backends of the
ops it runs."""
from bench.ops import OpSpec, Target
from bench.suites import model as model_suite

# The Qwen3.5-MoE model's prefill and decode (bench/suites/model/), on the backends of the ops it runs.
MODEL = OpSpec("model", sweep=model_suite, backend_ops=("gated_delta_rule", "attention", "route", "moe"),
               targets=(Target("Model training (forward, backward, AdamW step) on 2K-token sequences, bench checkpoint "
                               "(CPU, float32): at least 5x the tokens/s of transformers' Qwen3_5MoeForCausalLM",
                               "peer", 5.0, dict(phase="train", context=2048, variant="hybrid", device="cpu",
                                                 dtype="float32"), peer="transformers"),))


SPECS = (MODEL,)

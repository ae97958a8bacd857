"""The Qwen3.5-MoE model's prefill, decode and training (bench/suites/model/): a sweep of its own, on the backends of the
ops it runs."""
from bench.ops import OpSpec, Target
from bench.suites import model as model_suite

# The Qwen3.5-MoE model's prefill and decode (bench/suites/model/), on the backends of the ops it runs.
MODEL = OpSpec("model", sweep=model_suite, backend_ops=("gated_delta_rule", "attention", "route", "moe"),
               targets=(Target("Model training (forward, backward, AdamW step) on 2K-token sequences, bench checkpoint "
                               "(CPU, float32): at least 5x the tokens/s of transformers' Qwen3_5MoeForCausalLM",
                               "peer", 5.0, dict(phase="train", context=2048, variant="hybrid", device="cpu",
                                                 dtype="float32"), peer="transformers"),
                        # issue 26: the lab in bf16 against vLLM's CPU engine in bf16 (bench/peers/vllm_engine.py)
                        *(Target(f"Model {phase} at 2K tokens, bench checkpoint (CPU, bf16): at least 1.0x the tokens/s "
                                 f"of vLLM's CPU engine in bf16 where it runs", "peer", 1.0,
                                 dict(phase=phase, context=2048, variant="hybrid", device="cpu", dtype="bfloat16"),
                                 peer="vllm-cpu-bf16") for phase in ("prefill", "decode"))))


SPECS = (MODEL,)

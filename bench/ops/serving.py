"""The serving keywords at kernel level (bench/suites/serving/): a sweep of its own."""
from bench.ops import OpSpec, Target
from bench.suites import serving as serving_suite

# The gated delta rule as a server calls it (bench/suites/serving/), on the lab backends that declare the keywords;
# the kernel targets (issue 27), each backend against itself in one run.
SERVING = OpSpec(
    "serving", axes=("B", "T", "k", "every"), sweep=serving_suite, backend_ops=("gated_delta_rule",),
    targets=(Target("Speculative verify of T = 4 draft tokens per sequence (one call keeping the states, then "
                    "commit_states) costs at most 1.5x one decode step (gated delta rule, Qwen3.5-35B-A3B's heads, "
                    "CPU float32)", "cost", 1.5, dict(phase="verify", T=4), against=dict(phase="steps", k=1)),
             Target("Pooled decode (state_indices, in place) at batch 64 at least 1.3x gather / scatter decode "
                    "(index_select, call, index_copy_)", "speedup", 1.3, dict(phase="pooled", B=64),
                    against=dict(phase="gather", B=64))))


SPECS = (SERVING,)

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
                    against=dict(phase="gather", B=64)),
             # the model part (bench/suites/serving/model_part.py): the small random checkpoint, 1 thread
             Target("Speculative decoding with the prompt-lookup draft on a repetitive prompt: at least 1.5x the "
                    "tokens/s of plain greedy decoding, identical output (the model)", "speedup", 1.5,
                    dict(phase="speculative"), against=dict(phase="plain_decode")),
             Target("A second request sharing a 2K-token prefix prefills at least 5x faster than the first (the "
                    "model, model.cache.PrefixCache)", "speedup", 5.0, dict(phase="prefill_hit"),
                    against=dict(phase="prefill_first"))))


SPECS = (SERVING,)

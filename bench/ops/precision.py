"""The gated delta rule's state dtype (bench/suites/precision/): a sweep of its own."""
from bench.ops import OpSpec
from bench.suites import precision as precision_suite

# The gated delta rule's state dtype: error against float64 as the sequence grows, memory and decode time
# (bench/suites/precision/), on the backends that implement state_dtype.
PRECISION = OpSpec("precision", sweep=precision_suite, backend_ops=("gated_delta_rule",))


SPECS = (PRECISION,)

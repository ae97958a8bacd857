"""The gated delta rule's state dtype (bench/precision.py): a sweep of its own."""
from bench.ops import OpSpec

# The gated delta rule's state dtype: error against float64 as the sequence grows, memory and decode time
# (bench/precision.py), on the backends that implement state_dtype.
PRECISION = OpSpec("precision", sweep="bench.precision:sweep", backend_ops=("gated_delta_rule",),
                   summary="bench.precision:summary", table="bench.precision:table")


SPECS = (PRECISION,)

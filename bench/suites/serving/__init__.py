"""The gated delta rule as a server calls it (python -m bench.sweep --op serving): the decode state-traffic ledger,
speculative verify, pooled against gather / scatter decode, the prefix cache's chunk states, and the model part;
run.py runs it, report.py writes its lines and plots."""
from bench.suites import lazy_parts

__getattr__ = lazy_parts(__name__)

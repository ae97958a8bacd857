"""The gated delta rule's state dtype (python -m bench.sweep --op precision): error against float64 as the sequence
grows, memory, decode time; run.py runs it, report.py writes its lines, table and plots."""
from bench.suites import lazy_parts

__getattr__ = lazy_parts(__name__)

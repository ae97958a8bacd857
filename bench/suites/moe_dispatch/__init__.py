"""Expert parallelism's exchange (python -m bench.sweep --op moe_dispatch): worlds of spawned processes
(worlds.py), the measured parts (parts.py), the model on several processes (parallel_model.py), Qwen3.5-397B's
projected exchange (projection.py); run.py runs it, report.py writes its lines and plots."""
from bench.suites import lazy_parts

__getattr__ = lazy_parts(__name__)

"""The whole model (python -m bench.sweep --op model): prefill at a few contexts, decode steps on caches filled to
each context (model.cache.fill), the decode floor, cache memory, training tokens/s; transformers and llama.cpp beside
the lab's backends. run.py runs it, report.py writes its lines and plots; config, floor and measure are its
parts."""
from bench.suites import lazy_parts

__getattr__ = lazy_parts(__name__)

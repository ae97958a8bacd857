"""Timers a kernel engineer can trust, and the ceilings of the device at hand.

CPU: time.perf_counter around each call, after a warm-up call; repeats adapt to a time budget; the
median with p20 and p80 is reported, with the number of torch threads. The caches are flushed before every
timed call by reading a buffer twice the size of the last-level cache (so each call reads its inputs from
memory, as in a model: a decode step's experts, 100 MB at Qwen3.5-35B, fit in a server's L3 and would
otherwise run from it, faster than memory allows).
GPU: CUDA events around each call; the L2 cache is flushed before every timed call by writing a
256 MB buffer (so each call reads its inputs from HBM, as in a model); short kernels can be timed
as CUDA-graph replays (launch overhead out). The warm-up call keeps compilation and autotuning out of
the timed region. Ceilings are measured without flushing.
Collectives (time_collective): every rank of a torch.distributed group times the same call after a barrier, and
each call counts at the slowest rank's time, with the caches flushed as above.
"""
from __future__ import annotations

import glob
import statistics
import time
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

L2_FLUSH_BYTES = 256 * 2**20
CPU_FLUSH_MAX_BYTES = 2**30


@dataclass
class Timing:
    """Milliseconds per call: median, 20th and 80th percentiles and fastest over `repeats` timed calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    threads: int
    min_ms: float


def _summary(samples_ms: list[float]) -> Timing:
    p20, p80 = np.percentile(samples_ms, [20, 80])
    return Timing(statistics.median(samples_ms), float(p20), float(p80), len(samples_ms), torch.get_num_threads(),
                  min(samples_ms))


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes() -> int:
    """The size of this CPU's largest cache (Linux sysfs), 64 MB where it cannot be read."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=64 * 2**20)


@cache
def _cpu_flush_buffer() -> torch.Tensor:
    return torch.ones(min(2 * last_level_cache_bytes(), CPU_FLUSH_MAX_BYTES) // 4)


def flush_cpu_caches() -> None:
    """Reads a buffer twice the last-level cache's size (at most CPU_FLUSH_MAX_BYTES): evicts what the previous
    call left in the caches. A read, not a fill: large fills use stores that bypass the cache. A float32 sum:
    ~50 ms for 600 MB, 1 thread (torch's int32 sum is 15x slower)."""
    _cpu_flush_buffer().sum()


def time_cpu(fn, budget_s: float = 0.5, min_repeats: int = 3, max_repeats: int = 200, warmup: int = 1,
             flush_cache: bool = True) -> Timing:
    """Time fn() on the CPU: `warmup` untimed calls, then timed calls until `budget_s` is spent (at least
    `min_repeats`, at most `max_repeats`; a single call longer than the budget is timed min_repeats times
    only if that fits in 5 budgets, else once more). flush_cache: flush_cpu_caches() before each timed call,
    outside the timed region (its time counts against the budget)."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < max_repeats:
        if flush_cache:
            flush_cpu_caches()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        spent = time.perf_counter() - start
        if spent >= budget_s and (len(samples) >= min_repeats or spent + samples[-1] / 1e3 > 5 * budget_s):
            break
    return _summary(samples)


class _L2Flush:
    """Writes a 256 MB device buffer: evicts the inputs of the previous call from the L2 cache."""

    def __init__(self, device):
        self.buffer = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def __call__(self):
        self.buffer.zero_()


def time_cuda(fn, budget_s: float = 0.5, min_repeats: int = 10, max_repeats: int = 1000, warmup: int = 2,
              flush_l2: bool = True, cuda_graph: bool = False, device="cuda") -> Timing:
    """Time fn() on a CUDA device with events, the L2 flushed before each call (outside the events).

    cuda_graph: capture fn() once (after the warm-up, so compilation and autotuning are done) and time
    graph replays, which removes the CPU launch overhead of short kernels."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    run = fn
    if cuda_graph:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()  # first call on the side stream, as torch's graph docs ask
            torch.cuda.current_stream(device).synchronize()
            with torch.cuda.graph(graph, stream=stream):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        run = graph.replay
    flush = _L2Flush(device) if flush_l2 else None
    samples = []
    start = time.perf_counter()
    while len(samples) < max_repeats:
        if flush:
            flush()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        run()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end))
        if time.perf_counter() - start >= budget_s and len(samples) >= min_repeats:
            break
    return _summary(samples)


def time_collective(fn, group=None, device="cpu", budget_s: float = 0.5, min_repeats: int = 3,
                    max_repeats: int = 200, warmup: int = 1, flush_cache: bool = True) -> Timing:
    """Time fn(), a call every rank of the torch.distributed `group` makes at the same moment (collectives, and the
    work between them), on every rank together: `warmup` untimed calls; then per timed call the caches flushed
    (flush_cache: the CPU's caches, or a GPU's L2), a barrier so that the ranks start together, and each rank's
    wall-clock time of the call with the device synchronised on both sides (a host-synchronising collective is
    timed as the caller sees it). A call's time is the slowest rank's: one all_reduce MAX after each call, outside
    the timed region, which also gives every rank the slowest rank's elapsed budget, so that all ranks stop after
    the same call. Repeats as time_cpu's. Returns the same Timing on every rank (threads: this rank's)."""
    import torch.distributed as dist

    device = torch.device(device)
    flush = (_L2Flush(device) if device.type == "cuda" else flush_cpu_caches) if flush_cache else None
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    start = time.perf_counter()
    while len(samples) < max_repeats:
        if flush:
            flush()
        dist.barrier(group=group)
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        slowest = torch.tensor([elapsed_ms, time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        sample_ms, spent = slowest.tolist()
        samples.append(sample_ms)
        if spent >= budget_s and (len(samples) >= min_repeats or spent + sample_ms / 1e3 > 5 * budget_s):
            break
    return _summary(samples)


def time_call(fn, device, budget_s: float = 0.5, cuda_graph: bool = False, warmup: int = 1,
              flush_cache: bool = True) -> Timing:
    """The timer of the device: time_cuda on CUDA, time_cpu otherwise; flush_cache: flush the L2 (GPU) or the
    CPU's caches before each timed call."""
    if torch.device(device).type == "cuda":
        return time_cuda(fn, budget_s=budget_s, cuda_graph=cuda_graph, device=device, warmup=warmup,
                         flush_l2=flush_cache)
    return time_cpu(fn, budget_s=budget_s, warmup=warmup, flush_cache=flush_cache)


def device_model(device) -> str:
    """The exact device: the GPU's name, or the CPU's model name from /proc/cpuinfo."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            fields = dict(line.split(":", 1) for line in info.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        model = fields.get("model name", model)
        # a virtual machine's CPU may be named only "AMD EPYC": its family and model tell the generation
        if "cpu family" in fields:
            model += f" family {fields['cpu family']} model {fields.get('model', '?')}"
    except OSError:
        pass
    return model


def device_name(device) -> str:
    """The device of a row: its model, and on CPU the threads it ran on."""
    model = device_model(device)
    return model if torch.device(device).type == "cuda" else f"{model} ({torch.get_num_threads()} threads)"


def host_slug(device) -> str:
    """The device's model as a folder name ("amd-epyc-family-25-model-17", "nvidia-h200"): reports/<device type>/<slug>/."""
    return model_slug(device_model(device))


def model_slug(model: str) -> str:
    """A device model's folder name (host_slug's, for a model read from the rows' device_name)."""
    import re

    words = re.sub(r"\(.*?\)|\b(\d+-core|processor|cpu)\b|@.*", " ", model.lower())
    return re.sub(r"[^a-z0-9]+", "-", words).strip("-")


def matmul_tflops(dtype: torch.dtype, device, budget_s: float = 0.5) -> float:
    """Measured rate of one large square matmul in dtype (torch's default settings), TFLOP/s of the fastest
    call: a ceiling is what the device can do; other processes only ever slow a call down."""
    device = torch.device(device)
    n = 8192 if device.type == "cuda" else 1024
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype).to(device)
    b = torch.randn(n, n, generator=gen).to(dtype).to(device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    timing = time_call(lambda: torch.matmul(a, b, out=out), device, budget_s, flush_cache=False)
    return 2 * n**3 / (timing.min_ms * 1e-3) / 1e12


def copy_gbps(device, budget_s: float = 0.5, nbytes: int | None = None) -> float:
    """Measured bandwidth of a device copy, counting the bytes read plus the bytes written, GB/s (fastest call):
    of a large buffer (1 GiB on a GPU, 256 MiB on a CPU, read into as much), or, given `nbytes`, of a copy whose
    source and destination together span nbytes, repeated without flushing: a working set that fits a cache runs
    at the cache's rate, as a model's weights read step after step would."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 256 * 2**20
    else:
        nbytes //= 2
    src = torch.rand(max(nbytes // 4, 1), device=device)
    dst = torch.empty_like(src)
    timing = time_call(lambda: dst.copy_(src), device, budget_s, flush_cache=False)
    return 2 * nbytes / (timing.min_ms * 1e-3) / 1e9


def ceilings(device, dtypes, budget_s: float = 0.5) -> dict:
    """{"matmul_tflops": {dtype name: TFLOP/s}, "copy_gbps": GB/s, "device_name", "threads"} measured now."""
    name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
    return {"device_name": device_name(device), "threads": torch.get_num_threads(),
            "matmul_tflops": {name(d): matmul_tflops(d, device, budget_s) for d in dtypes},
            "copy_gbps": copy_gbps(device, budget_s)}

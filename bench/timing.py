"""Timers a kernel engineer can trust, and the ceilings of the device at hand.

CPU: time.perf_counter around each call, after a warm-up call; repeats adapt to a time budget; the
median with p20 and p80 is reported, with the number of torch threads. The caches are flushed before every
timed call by reading a buffer twice the size of the last-level cache (so each call reads its inputs from
memory, as in a model: a decode step's experts, 100 MB at Qwen3.5-35B, fit in a server's L3 and would
otherwise run from it, faster than memory allows).
GPU: CUDA events around each call; the L2 cache is flushed before every timed call by writing a
256 MB buffer (so each call reads its inputs from HBM, as in a model); short kernels can be timed
as CUDA-graph replays (launch overhead out). The warm-up call keeps compilation and autotuning out of
the timed region.
Ceilings (`ceilings`): the matmul ceiling of a dtype is the fastest of the host's GEMMs (torch.matmul, torch's
oneDNN, the lab's MKL packed GEMM, zentorch's where installed), timed interleaved in one run without flushing, each
GEMM's rate recorded; beside it the physical peak from the ISA and the clock. The bandwidth ceilings (read: a sum;
copy) are measured with the caches flushed on working sets from 64 KiB up, and a row's floor takes the one of its
own size (`bandwidth_at`).
Collectives (time_collective): every rank of a torch.distributed group times the same call after a barrier, and
each call counts at the slowest rank's time, with the caches flushed as above.
"""
from __future__ import annotations

import glob
import math
import os
import statistics
import time
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from bench.check import TOLERANCE, tolerance

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


# ------------------------------------------------------------------------------------------------ ceilings
# A ceiling is the best the host was measured to do in this run: the fastest of the GEMMs it offers, the read and copy
# bandwidths at each working-set size. Beside it, the physical peak the ISA and the clock allow (a model, not a
# measurement: it says how far every GEMM, the ceiling's included, sits from the silicon).

GEMM_SIZE = {"cpu": 2048, "cuda": 8192}
# working sets of the bandwidth ceilings, bytes: 64 KiB to 256 MiB (CPU) / 1 GiB (GPU), a factor 4 apart
BANDWIDTH_SIZES = {"cpu": tuple(4 ** i for i in range(8, 15)), "cuda": tuple(4 ** i for i in range(8, 16))}


def _dtype_name(dtype: torch.dtype) -> str:
    """bench.sweep.dtype_name (which imports this module)."""
    return str(dtype).removeprefix("torch.")


def _torch_matmul(a, b):
    out = torch.empty_like(a)
    return lambda: torch.matmul(a, b, out=out)


def _onednn_linear(a, b):
    """torch's own oneDNN (torch.utils.mkldnn.to_mkldnn of an nn.Linear holding b^T: the weight reordered once) on
    an input already in oneDNN's layout: a b, the output left in oneDNN's layout as a chain of such layers would."""
    if a.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        raise RuntimeError("needs torch built with oneDNN (mkldnn), on CPU tensors")
    from torch.utils import mkldnn

    linear = torch.nn.Linear(b.shape[0], b.shape[1], bias=False, dtype=a.dtype)
    with torch.no_grad():
        linear.weight.copy_(b.t())
        layer = mkldnn.to_mkldnn(linear, a.dtype)
    x = a.to_mkldnn()
    return lambda: layer(x)


def _mkl_packed(a, b):
    """The lab's MKL GEMM (kernellab.mkl.packed: cblas_sgemm_compute on a weight packed once), a b = a (b^T)^T."""
    from kernellab.mkl.packed import PackedExperts, packable

    w = b.t().contiguous()[None]  # [1, N, K]: the expert layout it packs
    if not packable(a, w):
        raise RuntimeError("needs float32 CPU tensors and torch built with MKL's packed GEMM")
    packed, out = PackedExperts(w), torch.empty_like(a)

    def call():
        return packed.linear(a, 0, out=out)

    call.weight = w  # PackedExperts holds only a weak reference to w: the call keeps it alive
    return call


def _zentorch_mm(a, b):
    """AMD's zentorch (ZenDNN) zentorch_mm, where zentorch is installed."""
    import importlib.util

    if a.device.type != "cpu" or importlib.util.find_spec("zentorch") is None:
        raise RuntimeError("zentorch is not installed (pip install .[cpu-peers])")
    import zentorch  # noqa: F401 - registers torch.ops.zentorch

    return lambda: torch.ops.zentorch.zentorch_mm(a, b)


# name -> maker(a, b) of a call computing a b; CPU: torch.matmul is MKL for float32 / float64 and oneDNN for the
# half types in torch's CPU build; CUDA: torch.matmul only (cuBLAS)
GEMMS = {"cpu": {"torch.matmul": _torch_matmul, "onednn": _onednn_linear, "mkl_packed": _mkl_packed,
                 "zentorch": _zentorch_mm},
         "cuda": {"torch.matmul": _torch_matmul}}


def gemm_rates(dtype: torch.dtype, device, n: int | None = None, budget_s: float = 0.5, min_rounds: int = 2) -> dict:
    """Each GEMM of GEMMS on the square n x n x n product in dtype (n: GEMM_SIZE by default), interleaved: round
    after round, one call of each, so the load of a shared machine weighs on all of them alike; until
    budget_s per GEMM is spent (at least min_rounds). Each GEMM's result is checked first on its first 64 rows
    against float64. Returns {"n", "best": the fastest GEMM within tolerance (None if none), "tflops": its rate,
    "gemms": {name: {"tflops", "rel_err"} (fastest call; other processes only ever slow a call down), or
    {"error"}}}."""
    device = torch.device(device)
    n = n or GEMM_SIZE[device.type]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype).to(device)
    b = torch.randn(n, n, generator=gen).to(dtype).to(device)
    rows = min(n, 64)
    expected = a[:rows].double() @ b.double()  # the exact product of the rounded operands
    found, calls = {}, {}
    for name, make in GEMMS[device.type].items():
        try:
            call = make(a, b)
            got = call()  # also the warm-up: packing, reordering, first-touch happen here
            got = got.to_dense() if got.is_mkldnn else got
            rel_err = float(torch.linalg.norm(got[:rows].double() - expected) / torch.linalg.norm(expected))
        except Exception as exc:  # noqa: BLE001 - a GEMM that cannot run here is recorded with its reason
            found[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]}
            continue
        found[name] = {"tflops": 0.0, "rel_err": rel_err}
        calls[name] = call
    best_s = dict.fromkeys(calls, math.inf)
    start, rounds, budget = time.perf_counter(), 0, budget_s * len(calls)
    # min_rounds, unless one round takes over 5 budgets (a GEMM the host runs without vector units: float16 here)
    while calls and (rounds == 0 or time.perf_counter() - start < budget or (
            rounds < min_rounds and (time.perf_counter() - start) / rounds <= 5 * budget)):
        for name, call in calls.items():
            synchronize(device)
            t0 = time.perf_counter()
            call()
            synchronize(device)
            best_s[name] = min(best_s[name], time.perf_counter() - t0)
        rounds += 1
    for name, seconds in best_s.items():
        found[name]["tflops"] = 2 * n**3 / seconds / 1e12
    # a GEMM beyond the backends' tolerance against float64 (tf32 allowed for float32 on a GPU) does not compute the
    # dtype's GEMM (a lower-precision mode): its rate is recorded, not a ceiling
    tol = tolerance(dtype, device.type) if dtype in TOLERANCE else math.inf
    exact = {name: row["tflops"] for name, row in found.items() if "tflops" in row and row["rel_err"] <= tol}
    best = max(exact, key=exact.get, default=None)
    return {"n": n, "rounds": rounds, "best": best, "tflops": exact.get(best, math.nan), "gemms": found}


def matmul_tflops(dtype: torch.dtype, device, budget_s: float = 0.5, n: int | None = None) -> float:
    """The matmul ceiling in dtype, TFLOP/s: the fastest of the host's GEMMs (gemm_rates) on a large square
    product."""
    return gemm_rates(dtype, device, n, budget_s)["tflops"]


def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo ({} where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as info:
            block = info.read().split("\n\n")[0]
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, value in
            (line.split(":", 1) for line in block.splitlines() if ":" in line)}


# The FMA units of a core where the flags overstate them: (vendor, family) -> [(first model, last model, name, FMA
# pipes, fp32 lanes per pipe)], FLOP per cycle = pipes x lanes x 2. Zen 4 runs AVX-512 on two 256-bit FMA pipes;
# Zen 5 has two 512-bit ones; Zen / Zen+ two 128-bit ones.
MICROARCHITECTURES = {
    ("AuthenticAMD", 23): [(0x00, 0x2F, "Zen / Zen+", 2, 4), (0x30, 0xFF, "Zen 2", 2, 8)],
    ("AuthenticAMD", 25): [(0x00, 0x0F, "Zen 3", 2, 8), (0x10, 0x1F, "Zen 4", 2, 8), (0x20, 0x5F, "Zen 3", 2, 8),
                           (0x60, 0x7F, "Zen 4", 2, 8), (0xA0, 0xAF, "Zen 4", 2, 8)],
    ("AuthenticAMD", 26): [(0x00, 0xFF, "Zen 5", 2, 16)],
}


CPUFREQ_MAX = "/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"  # kHz


def cpu_clock_ghz() -> tuple[float, str]:
    """(GHz, where it came from): cpufreq's cpuinfo_max_freq (the highest clock, boost included) where the kernel
    exposes it, else /proc/cpuinfo's "cpu MHz" (the clock now; in a virtual machine the host's nominal rate, below
    its boost: a measured rate may then exceed the peak computed from it)."""
    try:
        with open(CPUFREQ_MAX) as f:
            return int(f.read()) / 1e6, CPUFREQ_MAX
    except (OSError, ValueError):
        pass
    mhz = _cpuinfo().get("cpu MHz")
    return (float(mhz) / 1e3, "/proc/cpuinfo cpu MHz") if mhz else (math.nan, "no clock found")


def cpu_cores(threads: int) -> int:
    """Physical cores that `threads` threads of this process can occupy: threads sharing a core (SMT) share its FMA
    units."""
    info = _cpuinfo()
    per_core = max(1, int(info.get("siblings", 1)) // max(1, int(info.get("cpu cores", 1))))
    return max(1, min(threads, len(os.sched_getaffinity(0)) // per_core))


def cpu_flop_per_cycle(use_table: bool = True) -> tuple[dict, str]:
    """({dtype name: FLOP per cycle per core}, how it was obtained), from the ISA flags of /proc/cpuinfo: avx512f ->
    2 FMA units x 16 fp32 lanes x 2 FLOP = 64; avx2 + fma -> 2 x 8 x 2 = 32; SSE only -> 2 x 4 (an add and a mul
    pipe). With use_table, MICROARCHITECTURES corrects the FMA width by (vendor, family, model) where the flags
    overstate it. Halves: 2x the fp32 rate with avx512_bf16 / avx512_fp16 (two products per fp32 lane), 2048 per
    cycle with amx_bf16 / amx_fp16 (1024 FMA per cycle); the fp32 rate without (they convert). float64: half."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    lanes = 16 if "avx512f" in flags else 8 if "avx" in flags else 4
    fp32 = 2 * lanes * (2 if "fma" in flags or "avx512f" in flags else 1)
    isa = "avx512f" if lanes == 16 else "avx2+fma" if fp32 == 32 else "sse"
    how = f"/proc/cpuinfo flags ({isa}): 2 FMA units x {lanes} fp32 lanes x {fp32 // (2 * lanes)} FLOP"
    if use_table:
        vendor, family, model = info.get("vendor_id"), int(info.get("cpu family", -1)), int(info.get("model", -1))
        for first, last, name, pipes, width in MICROARCHITECTURES.get((vendor, family), []):
            if first <= model <= last:
                fp32 = 2 * pipes * width
                how = (f"table: {vendor} family {family} model {model} is {name}: {pipes} FMA pipes x {width} fp32 "
                       f"lanes x 2 FLOP")
                break
    found = {"float32": fp32, "float64": fp32 // 2, "bfloat16": fp32, "float16": fp32}
    for half, avx, amx in (("bfloat16", "avx512_bf16", "amx_bf16"), ("float16", "avx512_fp16", "amx_fp16")):
        found[half] = 2048 if amx in flags else 2 * fp32 if avx in flags else fp32
    return found, how


def physical_peak(device, threads: int | None = None, measured: dict | None = None) -> dict | None:
    """The CPU's physical peak: {"tflops": {dtype name: TFLOP/s}, "flop_per_cycle", "ghz", "cores", "how"} for
    `threads` threads (torch's by default). measured: {dtype name: TFLOP/s} of this run's GEMMs: a rate above the
    table's peak disproves the table (a hypervisor may show a CPU model other than the host's), and the flags'
    bound is used instead, saying so. None on a GPU (not modelled here)."""
    if torch.device(device).type != "cpu":
        return None
    ghz, clock = cpu_clock_ghz()
    cores = cpu_cores(threads or torch.get_num_threads())
    per_cycle, how = cpu_flop_per_cycle()
    peak = lambda rates: {name: rate * ghz * cores / 1e3 for name, rate in rates.items()}  # noqa: E731
    beaten = [name for name, rate in (measured or {}).items() if rate > peak(per_cycle).get(name, math.inf)]
    flags, flags_how = cpu_flop_per_cycle(use_table=False)
    if beaten and any(flags[name] > per_cycle[name] for name in beaten):
        per_cycle, how = flags, f"{flags_how} (the {how} was beaten by this run's {', '.join(beaten)} GEMM)"
    elif beaten:  # the flags' bound is the table's: the clock read must be below the one the GEMM ran at
        how += f" (exceeded by this run's {', '.join(beaten)} GEMM: the clock ran above the one read)"
    return {"tflops": peak(per_cycle), "flop_per_cycle": per_cycle, "ghz": ghz, "cores": cores,
            "how": f"{how}; clock {ghz:.3f} GHz from {clock}; x {cores} core(s)"}


def read_gbps(device, nbytes: int | None = None, budget_s: float = 0.5, flush_cache: bool = True) -> float:
    """Measured read bandwidth, GB/s (fastest call): a float32 sum over a buffer of nbytes (256 MiB on a CPU, 1 GiB
    on a GPU by default), the caches flushed before each call (flush_cache: as the sweep times its rows)."""
    device = torch.device(device)
    nbytes = nbytes or (2**30 if device.type == "cuda" else 256 * 2**20)
    buffer = torch.rand(max(nbytes // 4, 1), device=device)
    timing = time_call(buffer.sum, device, budget_s, flush_cache=flush_cache)
    return buffer.numel() * 4 / (timing.min_ms * 1e-3) / 1e9


def copy_gbps(device, budget_s: float = 0.5, nbytes: int | None = None, flush_cache: bool = False) -> float:
    """Measured bandwidth of a device copy, counting the bytes read plus the bytes written, GB/s (fastest call):
    of a large buffer (1 GiB on a GPU, 256 MiB on a CPU, read into as much), or, given `nbytes`, of a copy whose
    source and destination together span nbytes. flush_cache=False: repeated without flushing, a working set that
    fits a cache runs at the cache's rate, as a model's weights read step after step would (bench.model);
    True: the caches flushed before each call, as the sweep times its rows."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 256 * 2**20
    else:
        nbytes //= 2
    src = torch.rand(max(nbytes // 4, 1), device=device)
    dst = torch.empty_like(src)
    timing = time_call(lambda: dst.copy_(src), device, budget_s, flush_cache=flush_cache)
    return 2 * src.numel() * 4 / (timing.min_ms * 1e-3) / 1e9


def bandwidth_table(device, budget_s: float = 0.5, sizes=None) -> dict:
    """{"nbytes": [...], "read_gbps": [...], "copy_gbps": [...]}: read and copy bandwidth on each working-set size of
    `sizes` (BANDWIDTH_SIZES), caches flushed before each call; budget_s / 4 per point."""
    sizes = list(sizes or BANDWIDTH_SIZES[torch.device(device).type])
    return {"nbytes": sizes,
            "read_gbps": [read_gbps(device, n, budget_s / 4) for n in sizes],
            "copy_gbps": [copy_gbps(device, budget_s / 4, n, flush_cache=True) for n in sizes]}


def bandwidth_at(ceil: dict, nbytes: float | None = None) -> float:
    """The bandwidth ceiling, GB/s, of a working set of nbytes: the higher of the read and copy rates of
    ceil["bandwidth"] (bandwidth_table), interpolated in log size between the measured sizes, the end's rate beyond
    them; without nbytes, at the largest size. The higher, as a floor must be a lower bound on the time. A ceilings
    dict without the table (an older ceilings.json, a test's stub): its copy_gbps."""
    table = ceil.get("bandwidth")
    if not table:
        return ceil["copy_gbps"]
    sizes = np.log2(np.asarray(table["nbytes"], dtype=np.float64))
    rates = np.maximum(table["read_gbps"], table["copy_gbps"])
    at = sizes[-1] if nbytes is None or not nbytes > 0 else math.log2(nbytes)
    return float(np.interp(at, sizes, rates))


def ceilings(device, dtypes, budget_s: float = 0.5, gemm_n: int | None = None, bandwidth_sizes=None) -> dict:
    """The host's ceilings measured now: {"device_name", "threads", "matmul_tflops": {dtype name: the fastest GEMM's
    TFLOP/s}, "matmul": {dtype name: gemm_rates(...)} (each GEMM's rate and error, which won), "physical_peak"
    (physical_peak(), CPU only), "copy_gbps" and "read_gbps" (the largest working set), "bandwidth"
    (bandwidth_table: per working-set size; bandwidth_at reads it)}."""
    matmul = {_dtype_name(d): gemm_rates(d, device, gemm_n, budget_s) for d in dtypes}
    best = {name: found["tflops"] for name, found in matmul.items()}
    table = bandwidth_table(device, budget_s, bandwidth_sizes)
    return {"device_name": device_name(device), "threads": torch.get_num_threads(), "matmul_tflops": best,
            "matmul": matmul, "physical_peak": physical_peak(device, measured=best),
            "copy_gbps": table["copy_gbps"][-1], "read_gbps": table["read_gbps"][-1], "bandwidth": table}

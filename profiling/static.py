"""Static sm_90 report of every GPU kernel of the lab, built without a GPU.

    python -m profiling.static [--out reports/static] [--workers 2] [--force] [--only SUBSTRING]

Compiles every kernel for Hopper (sm_90) and writes `kernels.csv` and `kernels.md` under --out, one row per
kernel and configuration: registers per thread, shared memory, spills, stack frame, the occupancy those imply on
one H100/H200 SM, and the tensor-core instructions found in the machine code.

Where the kernels come from:
- Triton: every module `kernellab/triton/<name>.py` (names not starting with "_") lists `AOT_SPECS`, a list of
  `kernellab.triton.AotSpec` (built by `kernellab.triton.aot_spec` from the kernel's own parameters; the kernel may
  be an autotune / heuristics wrapper, compiled as the @triton.jit function inside it, the flags its heuristics
  would compute given as constexprs). Each is compiled with `triton.compile(triton_source(spec),
  target=GPUTarget("cuda", 90, 32))`; the ptxas report is the one Triton's own ptxas run prints (TRITON_DUMP_PTXAS_LOG). As at launch,
  pointers are specialised as 16-byte aligned; integers only where the spec says they are multiples of 16
  ("i32:16" in the signature, Triton's AOT notation, or a `divisible_by_16` attribute): without that the code
  can differ a lot from what runs (no vector loads, other pipelining, spills).
- CUDA C: every `kernellab/cuda/*.cu` through `nvcc -arch=sm_90 -cubin -Xptxas -v -I kernellab/cuda`. A .cu file may
  declare configurations in comment lines, one per line:
      // aot: <label> [threads=N] [dynamic_smem=BYTES] [nvcc flags such as -DBLOCK_K=64 or -gencode=...]
  Without one it is compiled once as is. Threads per block come from `__launch_bounds__` (read back from the
  cubin) or from `threads=`; without either the occupancy columns stay empty. Shared memory is the static amount
  ptxas reports plus `dynamic_smem=`.
- numba.cuda: modules `kernellab/numba_cuda/*.py` may list `AOT_SPECS` whose entries have `name`, `kernel`
  ("module:attr" of a `@cuda.jit` kernel) and `signature` (a numba signature string such as
  "void(float32[:, :], int32)"), optionally `threads`. They are compiled with `numba.cuda.compile_ptx(...,
  cc=(9, 0))` and then ptxas. numba.cuda kernels that no spec names are listed with status "skipped".

Rows are cached by a hash of what determines the machine code (the kernel's source and its Triton dependencies,
the configuration, the compiler versions): a kernel whose hash matches a row of the existing table is not
compiled again (--force recompiles everything).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import glob
import hashlib
import importlib
import importlib.util
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "reports" / "static"

# One Hopper SM (H100 / H200, compute capability 9.0).
SM90 = dict(registers=65536, register_unit=256, shared_bytes=233472,
            max_shared_per_block=232448, reserved_shared_per_block=1024, shared_unit=128, max_warps=64,
            max_blocks=32)
# Matrix instructions in SASS: HGMMA = Hopper warpgroup MMA (wgmma), HMMA = mma.sync / WMMA on half types,
# IMMA / QGMMA / IGMMA = integer and fp8 variants, DMMA = fp64.
TENSOR_OPS = ("HGMMA", "HMMA", "QGMMA", "IGMMA", "IMMA", "DMMA")
# Disabling the interpreter / simulator is what lets the compile happen: under TRITON_INTERPRET=1 @triton.jit
# returns an InterpretedFunction that triton.compile cannot take.
_SIMULATION_VARIABLES = ("TRITON_INTERPRET", "NUMBA_ENABLE_CUDASIM")

COLUMNS = ("kernel", "toolchain", "source", "config", "status", "threads", "registers", "shared_bytes",
           "spill_store_bytes", "spill_load_bytes", "stack_bytes", "local_ops", "blocks_per_sm", "warps_per_sm",
           "occupancy", "limiter", "tensor_ops", "source_hash")


@dataclasses.dataclass
class Job:
    """One kernel at one configuration to compile. `spec` is toolchain-specific (index, label, flags...)."""

    toolchain: str
    source: str  # path relative to the repository root
    spec: dict


# ---------------------------------------------------------------------------------------------- parsing


_ENTRY = re.compile(r"ptxas[\w-]* info\s*: Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"ptxas[\w-]* info\s*: Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas[\w-]* info\s*: Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, dict]:
    """The entry functions of a `ptxas -v` report: name -> {registers, shared_bytes (static), stack_bytes,
    spill_store_bytes, spill_load_bytes}. Device functions that were not inlined are left out."""
    entries: dict[str, dict] = {}
    frames: dict[str, tuple[int, int, int]] = {}
    current = properties_of = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = m.group(1)
            entries[current] = dict(registers=None, shared_bytes=0, stack_bytes=0, spill_store_bytes=0,
                                    spill_load_bytes=0)
        elif m := _PROPERTIES.search(line):
            properties_of = m.group(1)
        elif (m := _FRAME.search(line)) and properties_of is not None:
            frames[properties_of] = tuple(int(x) for x in m.groups())
            properties_of = None
        elif (m := _USED.search(line)) and current is not None:
            entries[current]["registers"] = int(m.group(1))
            if s := _SMEM.search(m.group(2)):
                entries[current]["shared_bytes"] = int(s.group(1))
    for name, entry in entries.items():
        if name in frames:
            entry["stack_bytes"], entry["spill_store_bytes"], entry["spill_load_bytes"] = frames[name]
    return entries


_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_SASS_OPCODE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def parse_sass(sass: str) -> dict[str, Counter]:
    """Opcode counts (without modifiers: HGMMA.64x128x16.F32.BF16 counts as HGMMA) per function of a
    `cuobjdump -sass` listing."""
    counts: dict[str, Counter] = {}
    current = None
    for line in sass.splitlines():
        if m := _SASS_FUNCTION.match(line):
            current = counts.setdefault(m.group(1), Counter())
        elif current is not None and (m := _SASS_OPCODE.match(line)):
            current[m.group(1)] += 1
    return counts


def tensor_summary(opcodes: Counter) -> str:
    """"HGMMA:8 HMMA:4", or "none" when no matrix instruction appears."""
    found = [f"{op}:{opcodes[op]}" for op in TENSOR_OPS if opcodes.get(op)]
    return " ".join(found) or "none"


def occupancy(registers: int | None, shared_bytes: int | None, threads: int | None) -> dict:
    """Resident blocks and warps per sm_90 SM for one kernel, and what limits them.

    Registers are allocated per warp in units of 256; each block also holds 1 KB of shared memory reserved by
    the system; the SM holds 228 KB of shared memory, 64K registers, 64 warps and 32 blocks."""
    if not registers or threads is None or shared_bytes is None:
        return dict(blocks_per_sm=None, warps_per_sm=None, occupancy=None, limiter="unknown threads per block"
                    if threads is None else "unknown")
    warps = -(-threads // 32)
    unit = SM90["register_unit"]
    registers_per_warp = -(-registers * 32 // unit) * unit
    block_shared = shared_bytes + SM90["reserved_shared_per_block"]
    block_shared = -(-block_shared // SM90["shared_unit"]) * SM90["shared_unit"]
    limits = {
        "warps": SM90["max_warps"] // warps,
        "blocks": SM90["max_blocks"],
        "registers": (SM90["registers"] // registers_per_warp) // warps,
        "shared memory": SM90["shared_bytes"] // block_shared if shared_bytes <= SM90["max_shared_per_block"]
        else 0,
    }
    limiter = min(limits, key=limits.get)
    blocks = limits[limiter]
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * warps, occupancy=round(blocks * warps / SM90["max_warps"], 3),
                limiter=limiter if blocks else f"does not fit ({limiter})")


# ---------------------------------------------------------------------------------------------- tools


def _triton_bin() -> Path | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin"


def find_tool(name: str) -> str | None:
    """A CUDA tool (nvcc, ptxas, cuobjdump, nvdisasm): on PATH, in the toolkit next to nvcc, under CUDA_HOME,
    or among the binaries Triton bundles."""
    candidates = [shutil.which(name)]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / name))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent / name))
    if (bundled := _triton_bin()) is not None:
        candidates.append(str(bundled / name))
    return next((c for c in candidates if c and os.access(c, os.X_OK) and Path(c).is_file()), None)


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _version(tool: str | None) -> str:
    if tool is None:
        return "absent"
    out = _run([tool, "--version"]).stdout
    return (re.findall(r"V\d+\.\d+\.\d+", out) or [out.strip().splitlines()[-1] if out.strip() else "?"])[-1]


def sass_counts(cubin: Path) -> tuple[dict[str, Counter] | None, str]:
    """Opcode counts per function of a cubin, and a note ("" or why they are missing)."""
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is not None:
        result = _run([cuobjdump, "-sass", str(cubin)])
        if result.returncode == 0:
            return parse_sass(result.stdout), ""
    nvdisasm = find_tool("nvdisasm")
    if nvdisasm is not None:
        result = _run([nvdisasm, "-c", str(cubin)])
        if result.returncode == 0:
            return _parse_nvdisasm(result.stdout), ""
    return None, "n/a: neither cuobjdump nor nvdisasm found (CUDA toolkit or the triton package)"


_NVDISASM_FUNCTION = re.compile(r"^\s*\.text\.(\S+):")
_NVDISASM_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def _parse_nvdisasm(listing: str) -> dict[str, Counter]:
    counts: dict[str, Counter] = {}
    current = None
    for line in listing.splitlines():
        if m := _NVDISASM_FUNCTION.match(line):
            current = counts.setdefault(m.group(1), Counter())
        elif current is not None and (m := _NVDISASM_OPCODE.match(line)):
            current[m.group(1)] += 1
    return counts


def _max_threads(cubin: Path) -> dict[str, int]:
    """threads per block fixed by __launch_bounds__ / reqntid, per function, read from the cubin's .nv.info."""
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        return {}
    listing = _run([cuobjdump, "-elf", str(cubin)]).stdout
    found, current = {}, None
    lines = listing.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(".nv.info."):
            current = line[len(".nv.info."):].strip()
        elif current and ("EIATTR_MAX_THREADS" in line or "EIATTR_REQNTID" in line):
            for follow in lines[i + 1:i + 4]:
                if follow.strip().startswith("Value:"):
                    dims = [int(v, 16) for v in follow.split(":", 1)[1].split()]
                    threads = 1
                    for d in dims[:3]:
                        threads *= d
                    found[current] = threads
                    break
    return found


def _demangle(name: str) -> str:
    """"moe_place<int>" for _Z9moe_placeIiEvPKT_xiPKiS4_Px: the C++ name with its template arguments, without the
    return type and parameter list (c++filt where available, else the mangled name)."""
    if not name.startswith("_Z") or shutil.which("c++filt") is None:
        return name
    full = _run(["c++filt", name]).stdout.strip() or name
    depth = 0
    for i, char in enumerate(full):
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "(" and depth == 0:
            full = full[:i]
            break
    return full.removeprefix("void ")


def _row(kernel, toolchain, source, config, status="ok", **values) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(kernel=kernel, toolchain=toolchain, source=source, config=config, status=status, **values)
    return row


def _measured_row(kernel, toolchain, source, config, source_hash, resources, threads, extra_shared, opcodes,
                  sass_note) -> dict:
    shared = resources["shared_bytes"] + extra_shared
    values = dict(threads=threads, registers=resources["registers"], shared_bytes=shared,
                  spill_store_bytes=resources["spill_store_bytes"], spill_load_bytes=resources["spill_load_bytes"],
                  stack_bytes=resources["stack_bytes"], source_hash=source_hash)
    if opcodes is None:
        values.update(tensor_ops=sass_note, local_ops=None)
    else:
        values.update(tensor_ops=tensor_summary(opcodes), local_ops=opcodes.get("LDL", 0) + opcodes.get("STL", 0))
    values.update(occupancy(resources["registers"], shared, threads))
    return _row(kernel, toolchain, source, config, **values)


def _error_row(kernel, toolchain, source, config, error, source_hash=None) -> dict:
    message = " ".join(str(error).split())
    return _row(kernel, toolchain, source, config, status=f"error: {message[:400]}", source_hash=source_hash)


def _hash(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- discovery


def _modules(package: str) -> list[str]:
    folder = ROOT.joinpath(*package.split("."))
    return [f"{package}.{Path(p).stem}" for p in sorted(glob.glob(str(folder / "*.py")))
            if not Path(p).stem.startswith("_")]


def _source_of(module: str) -> str:
    return str(Path(*module.split(".")).with_suffix(".py"))


_AOT_LINE = re.compile(r"^\s*//\s*aot:\s*(\S+)(.*)$", re.MULTILINE)


def cuda_configs(text: str) -> list[dict]:
    """The `// aot: label [threads=N] [dynamic_smem=B] [flags...]` lines of a .cu file; one plain config if none."""
    configs = []
    for label, rest in _AOT_LINE.findall(text):
        config = dict(label=label, threads=None, dynamic_smem=0, flags=[])
        for word in rest.split():
            key, _, value = word.partition("=")
            if key == "threads":
                config["threads"] = int(value)
            elif key == "dynamic_smem":
                config["dynamic_smem"] = int(value)
            else:
                config["flags"].append(word)
        configs.append(config)
    return configs or [dict(label="default", threads=None, dynamic_smem=0, flags=[])]


def discover() -> list[Job]:
    """Every kernel configuration of the lab, found from the files (no import needed here)."""
    jobs = [Job("triton", _source_of(module), dict(module=module)) for module in _modules("kernellab.triton")]
    for path in sorted(glob.glob(str(ROOT / "kernellab" / "cuda" / "*.cu"))):
        source = str(Path(path).relative_to(ROOT))
        jobs += [Job("cuda", source, config) for config in cuda_configs(Path(path).read_text())]
    jobs += [Job("numba", _source_of(module), dict(module=module)) for module in _modules("kernellab.numba_cuda")
             if "cuda.jit" in (ROOT / _source_of(module)).read_text()]
    return jobs


# ---------------------------------------------------------------------------------------------- compilers


def _worker_init():
    for name in _SIMULATION_VARIABLES:
        os.environ.pop(name, None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def _resolve(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def compile_triton_module(job: Job, cache: dict[str, list[dict]]) -> list[dict]:
    """Rows of every AotSpec of one kernellab/triton module."""
    import triton

    module_name = job.spec["module"]
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # an import error is the row's content
        return [_error_row(module_name, "triton", job.source, "-", f"import failed: {error!r}")]
    specs = getattr(module, "AOT_SPECS", None)
    if not specs:
        return [_error_row(module_name, "triton", job.source, "-", "module defines no AOT_SPECS")]
    versions = (triton.__version__, _version(find_tool("ptxas")))
    return [_compile_triton_spec(spec, job.source, cache, versions) for spec in specs]


# Bump when the way specs are compiled changes, so cached rows of the old way are recompiled.
TRITON_POLICY = "pointers-16-aligned,int-hints"


def triton_signature(spec) -> tuple[dict, list[str]]:
    """The spec's signature as triton.compile takes it, and the arguments to specialise as divisible by 16.

    At launch Triton specialises every pointer that is 16-byte aligned (every torch allocation is) and every
    integer that is a multiple of 16; ahead of time it cannot see the values, so: pointers are taken as aligned,
    and integers are marked by the spec, either with Triton's own AOT notation "i32:16" in the signature or by
    naming them in an optional `divisible_by_16` attribute of the spec."""
    signature, divisible = {}, []
    for name, kind in spec.signature.items():
        kind, _, hint = str(kind).partition(":")
        signature[name] = kind
        if kind.startswith("*") or hint == "16" or name in getattr(spec, "divisible_by_16", ()):
            divisible.append(name)
    return signature, divisible


def _triton_config(spec) -> str:
    signature, divisible = triton_signature(spec)
    constexprs = ",".join(f"{k}={v}" for k, v in spec.constexprs.items())
    types = sorted({t for t in signature.values() if t.startswith("*")})
    integers = [name for name in divisible if not signature[name].startswith("*")]
    hints = f" div16={','.join(integers)}" if integers else ""
    return f"warps={spec.num_warps} stages={spec.num_stages} {' '.join(types)} {constexprs}{hints}".strip()


def triton_source(spec):
    """The ASTSource triton.compile takes for spec, specialised as at launch (see triton_signature); its function
    is the @triton.jit one inside the kernel's autotune / heuristics wrappers."""
    from triton.compiler import ASTSource

    from kernellab.triton import jit_function

    fn = jit_function(_resolve(spec.kernel))
    signature, divisible = triton_signature(spec)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    return ASTSource(fn, signature=signature, constexprs=spec.constexprs, attrs=attrs)


def _compile_triton_spec(spec, source: str, cache: dict[str, list[dict]], versions) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    config = _triton_config(spec)
    try:
        ast_source = triton_source(spec)
        key = _hash(ast_source.fn.cache_key, repr(spec), TRITON_POLICY, *versions)
    except Exception as error:
        return _error_row(spec.name, "triton", source, config, error)
    if key in cache:
        return cache[key][0]
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as scratch, knobs.cache.scope(), knobs.nvidia.scope():
        # A private cache dir makes Triton run ptxas, so its resource report is printed and captured.
        knobs.cache.dir = scratch
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(ast_source, target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        except Exception as error:
            return _error_row(spec.name, "triton", source, config, error, key)
        cubin = Path(scratch) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        opcodes, note = sass_counts(cubin)
    name = compiled.metadata.name
    resources = parse_ptxas(log.getvalue()).get(name)
    if resources is None or resources["registers"] is None:
        return _error_row(spec.name, "triton", source, config, f"no ptxas report for {name}", key)
    return _measured_row(spec.name, "triton", source, config, key, resources, compiled.metadata.num_warps * 32,
                         compiled.metadata.shared, None if opcodes is None else opcodes.get(name, Counter()), note)


def compile_cuda(job: Job, cache: dict[str, list[dict]]) -> list[dict]:
    """Rows of every kernel of one .cu file at one `// aot:` configuration."""
    nvcc = find_tool("nvcc")
    config = job.spec
    label = " ".join([config["label"], *config["flags"]])
    path = ROOT / job.source
    if nvcc is None:
        return [_error_row(path.name, "cuda", job.source, label, "nvcc not found (no CUDA toolkit)")]
    headers = sorted(path.parent.glob("*.cuh")) + sorted(path.parent.glob("*.h"))
    key = _hash(path.read_bytes(), *(h.read_bytes() for h in headers), json.dumps(config, sort_keys=True),
                _version(nvcc), _version(find_tool("cuobjdump")))
    if key in cache:
        return cache[key]
    arch = [] if any(f.startswith(("-arch", "-gencode", "--gpu-architecture")) for f in config["flags"]) \
        else ["-arch=sm_90"]
    with tempfile.TemporaryDirectory() as scratch:
        cubin = Path(scratch) / "kernel.cubin"
        cmd = [nvcc, *arch, "-cubin", "-Xptxas", "-v", "-I", str(path.parent), *config["flags"], "-o", str(cubin),
               str(path)]
        result = _run(cmd)
        if result.returncode != 0:
            return [_error_row(path.name, "cuda", job.source, label, result.stderr.strip()[-600:], key)]
        entries = parse_ptxas(result.stdout + result.stderr)
        if not entries:
            return [_error_row(path.name, "cuda", job.source, label,
                               "no kernel in the cubin (templates without explicit instantiation?)", key)]
        sass, note = sass_counts(cubin)
        bounds = _max_threads(cubin)
    rows = []
    for name, resources in entries.items():
        threads = bounds.get(name, config["threads"])
        opcodes = None if sass is None else sass.get(name, Counter())
        rows.append(_measured_row(_demangle(name), "cuda", job.source, label, key, resources, threads,
                                  config["dynamic_smem"], opcodes, note))
    return rows


def _numba_without_nvrtc():
    """numba-cuda asks NVRTC only for the list of supported architectures and a path; this toolkit ships NVVM and
    libdevice (all compile_ptx needs) but no NVRTC, so answer those two questions without it."""
    from numba.cuda import cuda_paths
    from numba.cuda.cudadrv import nvrtc

    try:
        nvrtc.get_supported_ccs()
    except Exception:
        nvrtc.get_supported_ccs = lambda: [(9, 0)]
        cuda_paths._get_nvrtc_path = lambda: cuda_paths._env_path_tuple("absent", None)
    if "CUDA_HOME" not in os.environ:
        nvcc = find_tool("nvcc")
        homes = ["/usr/local/cuda", *([str(Path(os.path.realpath(nvcc)).parent.parent)] if nvcc else [])]
        home = next((h for h in homes if (Path(h) / "nvvm" / "libdevice").is_dir()), None)
        if home:
            os.environ["CUDA_HOME"] = home


def compile_numba_module(job: Job, cache: dict[str, list[dict]]) -> list[dict]:
    """Rows of the numba.cuda kernels of one kernellab/numba_cuda module."""
    module_name = job.spec["module"]
    try:
        _numba_without_nvrtc()
        from numba import cuda
        from numba.cuda.dispatcher import CUDADispatcher

        module = importlib.import_module(module_name)
    except Exception as error:
        return [_error_row(module_name, "numba", job.source, "-", f"import failed: {error!r}")]
    specs = list(getattr(module, "AOT_SPECS", []) or [])
    kernels = {name for name, obj in vars(module).items() if isinstance(obj, CUDADispatcher)}
    rows, named = [], set()
    ptxas = find_tool("ptxas")
    for spec in specs:
        module_of, _, attr = spec.kernel.partition(":")
        dispatcher = _resolve(spec.kernel)
        if not isinstance(dispatcher, CUDADispatcher):
            continue
        named.add(attr)
        config = str(spec.signature)
        key = _hash(Path(importlib.import_module(module_of).__file__).read_bytes(), repr(spec), _version(ptxas))
        if key in cache:
            rows.append(cache[key][0])
            continue
        try:
            ptx, _ = cuda.compile_ptx(dispatcher.py_func, spec.signature, cc=(9, 0), lineinfo=False)
            with tempfile.TemporaryDirectory() as scratch:
                ptx_path, cubin = Path(scratch) / "kernel.ptx", Path(scratch) / "kernel.cubin"
                ptx_path.write_text(ptx)
                result = _run([ptxas, "-v", "--gpu-name=sm_90", str(ptx_path), "-o", str(cubin)])
                if result.returncode != 0:
                    raise RuntimeError(result.stderr.strip()[-600:])
                entries = parse_ptxas(result.stdout + result.stderr)
                sass, note = sass_counts(cubin)
            name, resources = next(iter(entries.items()))
            rows.append(_measured_row(spec.name, "numba", job.source, config, key, resources,
                                      getattr(spec, "threads", None), 0,
                                      None if sass is None else sass.get(name, Counter()), note))
        except Exception as error:
            rows.append(_error_row(spec.name, "numba", job.source, config, error, key))
    for name in sorted(kernels - named):
        rows.append(_row(f"{module_name.rsplit('.', 1)[-1]}.{name}", "numba", job.source, "-",
                         status="skipped: no AOT_SPECS entry gives its signature"))
    return rows


_COMPILERS = {"triton": compile_triton_module, "cuda": compile_cuda, "numba": compile_numba_module}


def _compile(job: Job, cache: dict[str, list[dict]]) -> list[dict]:
    try:
        return _COMPILERS[job.toolchain](job, cache)
    except Exception as error:  # one broken kernel must not hide the others
        return [_error_row(job.source, job.toolchain, job.source, "-", f"{type(error).__name__}: {error}")]


# ---------------------------------------------------------------------------------------------- table


def load_cache(path: Path) -> dict[str, list[dict]]:
    """Rows of an earlier table that compiled, by source hash (CSV strings turned back into numbers)."""
    if not path.exists():
        return {}
    cache = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            if row.get("status") != "ok" or not row.get("source_hash"):
                continue
            for key, value in row.items():
                if value == "":
                    row[key] = None
                elif re.fullmatch(r"-?\d+", value or "") and key not in ("kernel", "config", "source_hash"):
                    row[key] = int(value)
                elif key == "occupancy":
                    row[key] = float(value)
            cache.setdefault(row["source_hash"], []).append(row)
    return cache


def build_table(jobs: list[Job], cache: dict[str, list[dict]], workers: int = 2) -> list[dict]:
    """Compile every job in `workers` fresh processes (TRITON_INTERPRET and NUMBA_ENABLE_CUDASIM removed there)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, workers), mp_context=context,
                                                initializer=_worker_init) as pool:
        results = list(pool.map(_compile, jobs, [cache] * len(jobs)))
    return [row for rows in results for row in rows]


def _cell(value) -> str:
    if value is None:
        return ""
    return str(value)


def findings(rows: list[dict]) -> list[str]:
    """Markdown bullets, one per kernel, for what a kernel engineer should look at first: failures, spills and
    local memory, kernels that do not fit on an SM, and matrix kernels that missed Hopper's wgmma (HMMA only)."""
    notes = []
    for row in rows:
        name = f"`{row['kernel']}`" + (f" ({row['config']})" if row.get("toolchain") == "cuda"
                                       and row["config"] != "default" else "")
        if row["status"].startswith("error"):
            notes.append(f"- {name}: {row['status']}")
            continue
        if row["status"] != "ok":
            continue
        found = []
        if (row["spill_store_bytes"] or 0) + (row["spill_load_bytes"] or 0) or row["local_ops"]:
            found.append(f"spills {row['spill_store_bytes']} B stored / {row['spill_load_bytes']} B loaded, "
                         f"{row['local_ops']} local-memory instructions at {row['registers']} registers")
        if row["limiter"] and str(row["limiter"]).startswith("does not fit"):
            found.append(f"{row['limiter']} with {row['shared_bytes']} B of shared memory")
        ops = str(row["tensor_ops"] or "")
        if "HMMA" in ops and "HGMMA" not in ops:
            found.append("matrix products on mma.sync (HMMA), not Hopper's wgmma (HGMMA)")
        if found:
            notes.append(f"- {name}: {'; '.join(found)}")
    return notes


def write_table(rows: list[dict], out: Path) -> tuple[Path, Path]:
    """kernels.csv (every column) and kernels.md (a readable table and the notes) under out."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "kernels.csv", out / "kernels.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: _cell(row.get(k)) for k in COLUMNS} for row in rows)
    shown = [c for c in COLUMNS if c not in ("source_hash", "toolchain")]
    lines = ["# Static sm_90 report of the lab's GPU kernels", "",
             "Generated by `python -m profiling.static` (no GPU needed): each kernel compiled for Hopper (sm_90), "
             "resources from ptxas, matrix instructions from the SASS (`cuobjdump -sass`).", "",
             "- occupancy: resident warps per SM / 64 on an H100/H200 SM (65536 registers in 256-register units "
             "per warp, 228 KB shared memory with 1 KB reserved per block, 64 warps, 32 blocks); `limiter` names "
             "the resource that binds.",
             "- shared_bytes: Triton's dynamic shared memory plus ptxas's static amount; for .cu files the static "
             "amount plus the `dynamic_smem=` of the file's `// aot:` line (dynamic memory set at launch is "
             "otherwise not visible).",
             "- local_ops: LDL + STL instructions in the SASS (local memory: spills or arrays indexed at run time).",
             "- tensor_ops: HGMMA (Hopper wgmma), HMMA (mma.sync / WMMA) and other matrix instructions with counts; "
             "none means the kernel does its products on the CUDA cores.",
             "- threads: from the Triton config (num_warps x 32), `__launch_bounds__`, or the `threads=` of an "
             "`// aot:` line; empty (and no occupancy) when none says.",
             "- Triton configs: pointers are compiled as 16-byte aligned (as Triton specialises them at launch); "
             "`div16=` lists the integer arguments the spec declares multiples of 16 (\"i32:16\"). Integers not "
             "declared are compiled as arbitrary values, which can cost vector loads and pipelining.", "",
             "## Worth a look", "", *(findings(rows) or ["Nothing: no spills, no local memory, everything fits."]),
             "", "## All kernels", "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in shown) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def main(argv=None) -> int:
    from bench import cli

    parser = cli.ArgumentParser(prog="python -m profiling.static", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=cli.out_folder, default=DEFAULT_OUT, help="folder of kernels.csv and kernels.md")
    parser.add_argument("--cache", type=cli.existing_file, default=None,
                        help="an earlier kernels.csv whose rows are reused when their hash matches "
                             "(default: the one under --out)")
    parser.add_argument("--force", action="store_true", help="recompile everything")
    parser.add_argument("--workers", type=cli.positive_int, default=2, help="compiler processes (default 2)")
    parser.add_argument("--only", default=None, help="compile only sources whose path contains this")
    args = parser.parse_args(argv)
    found = discover()
    jobs = [job for job in found if args.only is None or args.only in job.source]
    if not jobs:
        parser.error(f"--only {args.only!r}: no kernel source's path contains it; sources: "
                     f"{', '.join(dict.fromkeys(job.source for job in found))}")
    cache = {} if args.force else load_cache(args.cache or args.out / "kernels.csv")
    rows = build_table(jobs, cache, args.workers)
    csv_path, md_path = write_table(rows, args.out)
    failed = [row for row in rows if row["status"].startswith("error")]
    for row in rows:
        print(f"{row['status'][:60]:<12} {row['kernel']:<50} regs={_cell(row['registers']):<4} "
              f"smem={_cell(row['shared_bytes']):<7} spills={_cell(row['spill_store_bytes'])}/"
              f"{_cell(row['spill_load_bytes'])} occ={_cell(row['occupancy'])} tc={_cell(row['tensor_ops'])}")
    print(f"{len(rows)} rows, {len(failed)} failed -> {csv_path}, {md_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

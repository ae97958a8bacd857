"""pytest-benchmark micro-benchmarks of the hot CPU paths, one per lab CPU backend.

    pytest bench/micro --benchmark-json=reports/cpu/<host>/micro.json            # save
    pytest bench/micro --benchmark-compare=<saved run> --benchmark-autosave  # compare with a saved run

Kept out of tests/ so the parity suite stays untimed. Inputs come from bench.ops.make, seeded per shape.
"""
import pytest
import torch

import kernellab
from bench.ops import make

# prefill of the gated delta rule: one sequence of 512 tokens, Qwen3.5's head ratio at K = V = 128
GDR_CHUNK = dict(B=1, T=512, Hk=2, Hv=4, K=128, V=128, initial_state=True)
# MoE decode: one token through top-8 of 64 experts (hidden 1024, expert size 256)
MOE_DECODE = dict(N=1, D=1024, E=64, I=256, top_k=8)
# token permutation of a 1024-token batch, top-8 of 64 experts
PERMUTE = dict(N=1024, D=1024, E=64, top_k=8)


def cpu_backends(op):
    """Lab backends of op that run natively on the CPU (no interpreter or simulator, no reference, no peers)."""
    registered = kernellab.registry.registered(op)
    return [name for name in kernellab.backends(op, "cpu")
            if name != "reference" and not registered[name].peer and "cpu" in registered[name].places]


@pytest.fixture(autouse=True)
def trusted_inputs(monkeypatch):
    monkeypatch.setenv("KERNELLAB_TRUST_INPUTS", "1")  # time the kernels, not the host-side value checks


@pytest.mark.parametrize("backend", cpu_backends("gated_delta_rule"))
def test_gated_delta_rule_chunk(benchmark, backend):
    x = make("gated_delta_rule", **GDR_CHUNK, seed=1)
    fn = kernellab.get("gated_delta_rule", backend)
    benchmark.extra_info.update(GDR_CHUNK, threads=torch.get_num_threads())
    o, _ = benchmark(fn, **x, mode="chunk")
    assert o.shape == x["v"].shape


@pytest.mark.parametrize("backend", cpu_backends("moe"))
def test_moe_decode(benchmark, backend):
    x = make("moe", **MOE_DECODE, seed=2)
    fn = kernellab.get("moe", backend)
    benchmark.extra_info.update(MOE_DECODE, threads=torch.get_num_threads())
    y = benchmark(fn, **x)
    assert y.shape == x["x"].shape


@pytest.mark.parametrize("backend", cpu_backends("moe_permute"))
def test_moe_permute(benchmark, backend):
    x = make("moe_permute", **PERMUTE, seed=3)
    fn = kernellab.get("moe_permute", backend)
    benchmark.extra_info.update(PERMUTE, threads=torch.get_num_threads())
    p = benchmark(fn, **x)
    assert p.x.shape == (PERMUTE["N"] * PERMUTE["top_k"], PERMUTE["D"])

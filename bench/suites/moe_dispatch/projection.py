"""Qwen3.5-397B's exchange at EP 8, 16 and 32, projected from the bytes per token the runs measure, at link rates and
DeepEP's published rates."""
from __future__ import annotations

import math
from dataclasses import dataclass

from bench.ops import MODELS


@dataclass(frozen=True)
class Rate:
    """A published rate: GB/s per GPU and direction (dispatch, combine), where it was measured, its source."""

    what: str
    dispatch_gbps: float
    combine_gbps: float
    source: str


GPUS_PER_NODE = 8  # an HGX H200 node: 8 GPUs on NVLink, one 400 Gb/s NIC each


NVLINK = Rate("NVLink 4 link rate, H200", 450.0, 450.0,
              "NVIDIA H200 datasheet: 900 GB/s per GPU, both directions together")


INFINIBAND = Rate("InfiniBand NDR link rate", 50.0, 50.0, "ConnectX-7, 400 Gb/s per GPU's NIC")


# DeepEP V1 normal kernels, H800 (NVLink ~160 GB/s, CX7 400 Gb/s), DeepSeek-V3 settings (4096 tokens, 7168 hidden,
# top-8, fp8 dispatch, bf16 combine): the bottleneck bandwidth by EP size (docs/legacy.md; EP 8 in ANCHORS.md).
# Its low-latency kernels, 128 tokens, same settings: (dispatch, combine) us by EP size.
DEEPEP_LOW_LATENCY_US = {8: (77, 114), 16: (118, 195), 32: (155, 273)}


DEEPEP = {8: Rate("DeepEP intranode, NVLink, H800", 153.0, 158.0, "ANCHORS.md; deepseek-ai/DeepEP docs/legacy.md"),
          16: Rate("DeepEP internode, RDMA, H800", 43.0, 43.0, "deepseek-ai/DeepEP docs/legacy.md"),
          32: Rate("DeepEP internode, RDMA, H800", 58.0, 57.0, "deepseek-ai/DeepEP docs/legacy.md")}


# The experts' compute: the best published fused-MoE rate of ANCHORS.md (Liger, H100, bf16 inference; an H200 has
# the H100's tensor cores and clocks) and H200's HBM bandwidth (datasheet, ANCHORS.md).
EXPERT_TFLOPS = 523.0


EXPERT_RATE_SOURCE = "Liger fused MoE, bf16 inference, H100 (ANCHORS.md)"


HBM_GBPS = 4800.0


PROJECTED_MODEL = "Qwen3.5-397B-A17B"


PROJECTED_EP = (8, 16, 32)


PROJECTED_TOKENS = (128, 4096)  # per rank: a decode batch (DeepEP's low-latency setting), a prefill chunk


def bytes_per_token(world: int, top_k: int, D: int, itemsize: int, E: int, N: int, part: str = "dispatch+combine",
                    others: int | None = None) -> float:
    """Bytes that leave a rank per token per MoE layer in the exchange of kernellab.distributed, under uniform
    routing: each of a token's top_k slots lands on any of the W ranks alike, so (W - 1) / W of them go away, D
    elements each (out in dispatch, back in combine); dispatch also sends its per-expert counts (E / W int64) to
    each other rank once per call (N tokens). others: count only the slots and counts for that many of the W - 1
    other ranks (those inside the node, or outside it)."""
    others = world - 1 if others is None else others
    rows = top_k * others / world * D * itemsize
    counts = others * (E // world) * 8 / N
    return {"dispatch": rows + counts, "combine": rows, "dispatch+combine": 2 * rows + counts}[part]


def nodes_reached(world: int, top_k: int, E: int, gpus_per_node: int = GPUS_PER_NODE) -> float:
    """Expected number of other nodes that one token's top_k distinct experts reach (uniform routing): what crosses
    the network per token when a token is sent once per node and forwarded inside it (DeepEP's scheme)."""
    nodes = world // gpus_per_node
    if nodes <= 1:
        return 0.0
    per_node = E // nodes
    missed = math.comb(E - per_node, top_k) / math.comb(E, top_k)
    return (nodes - 1) * (1 - missed)


def project(model: str = PROJECTED_MODEL, worlds=PROJECTED_EP, tokens_per_rank=PROJECTED_TOKENS,
            itemsize: int = 2) -> list[dict]:
    """The exchange and the experts of one MoE layer of `model` (bench.ops.MODELS) on one rank, at each EP
    size and tokens per rank, in a dtype of `itemsize` bytes (bf16). One dict each with
    bytes_per_token: out and back (bytes_per_token);
    nvlink_bytes, ib_bytes: the rank's dispatch bytes to the other ranks of its node (NVLink) and to those outside
      it (InfiniBand), GPUS_PER_NODE GPUs per node (combine sends as many back, without the counts);
    ib_bytes_per_node: what InfiniBand would carry if each token crossed once per node reached (nodes_reached);
    link_ms: dispatch + combine at the link rates (NVLINK, INFINIBAND), both links busy at once (the slower one
      decides);
    deepep_ms: the same at DeepEP's measured bottleneck bandwidth (NVLink bytes at its intranode rate, InfiniBand
      bytes at its RDMA rate of that EP size);
    expert_flops, expert_weight_bytes, experts_ms: the rank's local experts on its N top_k slots (balanced), at
      EXPERT_TFLOPS or reading the weights of its active experts at HBM_GBPS, whichever takes longer."""
    m = MODELS[model]
    D, E, k, I = m["hidden"], m["experts"], m["top_k"], m["expert_size"]
    found = []
    for world in worlds:
        inside = min(world, GPUS_PER_NODE) - 1  # other ranks on the same node
        for N in tokens_per_rank:
            link_s = deepep_s = 0.0
            for part in ("dispatch", "combine"):
                nvl = N * bytes_per_token(world, k, D, itemsize, E, N, part, others=inside)
                ib = N * bytes_per_token(world, k, D, itemsize, E, N, part, others=world - 1 - inside)
                link_s += max(nvl / (getattr(NVLINK, f"{part}_gbps") * 1e9),
                              ib / (getattr(INFINIBAND, f"{part}_gbps") * 1e9))
                deepep_s += max(nvl / (getattr(DEEPEP[GPUS_PER_NODE], f"{part}_gbps") * 1e9),
                                ib / (getattr(DEEPEP[world], f"{part}_gbps") * 1e9) if ib else 0.0)
                if part == "dispatch":
                    nvlink_bytes, ib_bytes = nvl, ib
            flops = N * k * (6 * D * I + 5 * I + 2 * D)
            active = E / world * (1 - (1 - k / E) ** (N * world))  # local experts that the world's tokens reach
            weight_bytes = active * 3 * D * I * itemsize
            experts_s = max(flops / (EXPERT_TFLOPS * 1e12), weight_bytes / (HBM_GBPS * 1e9))
            found.append(dict(model=model, world=world, N=N, D=D, E=E, top_k=k, I=I, itemsize=itemsize,
                              bytes_per_token=bytes_per_token(world, k, D, itemsize, E, N),
                              nvlink_bytes=nvlink_bytes, ib_bytes=ib_bytes,
                              ib_bytes_per_node=N * nodes_reached(world, k, E) * D * itemsize,
                              link_ms=link_s * 1e3, deepep_ms=deepep_s * 1e3, expert_flops=flops,
                              expert_weight_bytes=weight_bytes, experts_ms=experts_s * 1e3))
    return found

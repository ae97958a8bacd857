"""CPU backends on oneDNN (the oneDNN inside torch's CPU build, reached through torch.ops.mkldnn): the MoE layer on
expert weights reordered once per weight tensor (kernellab/onednn/moe.py). Not an "auto" choice: the reordered
copies add to the weights' memory.

Backward: the torch backend's, which recomputes what it needs from the inputs (the same expert products)."""
from kernellab.registry import batch_variant, family_backends

BACKENDS = batch_variant(
    family_backends("kernellab.onednn", "onednn", ("cpu",), ops=("moe",), requires=("numba",),
                    probe="kernellab.onednn.moe:unavailable_reason",
                    backward={"moe": "kernellab.torch.moe:moe_backward"}, row_major=True),
    {"moe": "CPU GEMM blocking depends on M: an expert's rows take a streamed matrix-vector product "
            "(up to kernellab.onednn.moe.STREAM_ROWS rows) or oneDNN's blocked GEMM, and round a token's sums otherwise "
            "with the other tokens routed to that expert"})

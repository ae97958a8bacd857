"""Chunked linear attention on CPU: the torch backend's algorithm with the pass over chunks run by
kernels.mkl.state_pass (one compiled loop of MKL GEMMs). The token-by-token mode is the torch backend's."""
from kernels.mkl.state_pass import state_pass
from kernels.torch import linear_attention as torch_la


def linear_attention(**kwargs):
    """As kernels.torch.linear_attention.linear_attention: q, k [B, T, H, K]; v [B, T, H, V]; g None or
    [B, T, H]; initial_state None or [N, H, K, V]. Returns (o [B, T, H, V], final state or None)."""
    return torch_la.linear_attention(**kwargs, sequential_pass=state_pass)

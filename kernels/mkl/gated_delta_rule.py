"""The gated delta rule on CPU: the torch backend's algorithm with the pass over chunks run by
kernels.mkl.state_pass (one compiled loop of MKL GEMMs). The token-by-token mode is the torch backend's."""
from kernels.mkl.state_pass import state_pass
from kernels.torch import gated_delta_rule as torch_gdr


def gated_delta_rule(**kwargs):
    """As kernels.torch.gated_delta_rule.gated_delta_rule: q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta
    [B, T, Hv]; initial_state None or [N, Hv, K, V]. Returns (o [B, T, Hv, V], final state or None)."""
    return torch_gdr.gated_delta_rule(**kwargs, sequential_pass=state_pass)

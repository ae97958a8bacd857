"""The float64 references of the attention family (reference/gated_delta_rule.py, linear_attention.py,
attention.py) against implementations written elsewhere, called directly (not through the lab's peer wrappers):
transformers' pure-torch Qwen3.5 Gated DeltaNet, fla's naive PyTorch references, and torch's SDPA.

transformers and fla's naive functions compute in float32 whatever their inputs: they get the float32 inputs,
the reference their float64 copy, and the float32 tolerance applies. SDPA runs in float64."""
import pytest
import torch
import torch.nn.functional as F

from bench.ops import make
from reference.attention import attention as reference_attention
from reference.gated_delta_rule import gated_delta_rule as reference_gdr
from reference.linear_attention import linear_attention as reference_linear_attention
from tests.helpers import assert_close, to_float64

GDR_CASES = {
    "gqa_state_l2norm": dict(T=130, Hk=2, Hv=4, initial_state=True),
    "no_l2norm_beta_high": dict(T=70, Hk=2, Hv=2, beta="high", use_qk_l2norm=False, initial_state=True),
    "strong_decay": dict(T=100, Hk=1, Hv=2, gate="strong", initial_state=True),
    "g_zero_beta_low": dict(T=65, gate="zero", beta="low"),
    "T1": dict(T=1, initial_state=True),
}


def _qwen():
    pytest.importorskip("transformers")
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as qwen

    return qwen


def _unwrapped(fn):
    """The pure-torch original under transformers' hub-kernel decorator."""
    return getattr(fn, "__wrapped__", fn)


def _reference_gdr(args):
    return reference_gdr(**to_float64(args))


@pytest.mark.parametrize("case", GDR_CASES)
@pytest.mark.parametrize("name", ["torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"])
def test_gated_delta_rule_vs_transformers(name, case, seed):
    fn = _unwrapped(getattr(_qwen(), name))
    args = make("gated_delta_rule", seed=seed, **GDR_CASES[case])
    o, state = fn(args["q"], args["k"], args["v"], args["g"], args["beta"], initial_state=args["initial_state"],
                  output_final_state=True, use_qk_l2norm_in_kernel=args["use_qk_l2norm"])
    ref_o, ref_state = _reference_gdr(args)
    assert_close(o, ref_o, torch.float32, f"{name} o", seed)
    assert_close(state, ref_state, torch.float32, f"{name} state", seed)


def test_gated_delta_rule_packed_vs_transformers_per_sequence(seed):
    """cu_seqlens in the reference = transformers run on each sequence from its own initial state."""
    fn = _unwrapped(_qwen().torch_chunk_gated_delta_rule)
    seqlens = [37, 1, 70]
    args = make("gated_delta_rule", seqlens=seqlens, seed=seed, initial_state=True)
    ref_o, ref_state = _reference_gdr(args)
    bounds = args["cu_seqlens"].tolist()
    for n, (s, e) in enumerate(zip(bounds, bounds[1:])):
        o, state = fn(*(args[key][:, s:e] for key in ("q", "k", "v", "g", "beta")),
                      initial_state=args["initial_state"][n:n + 1], output_final_state=True,
                      use_qk_l2norm_in_kernel=True)
        assert_close(o, ref_o[:, s:e], torch.float32, f"sequence {n} o", seed)
        assert_close(state, ref_state[n:n + 1], torch.float32, f"sequence {n} state", seed)


def _fla_layout(args):
    """fla's naive references take q, k with the value heads' count: repeat each key head Hv // Hk times."""
    group = args["v"].shape[2] // args["q"].shape[2]
    return [args[key].repeat_interleave(group, dim=2) for key in ("q", "k")]


@pytest.mark.parametrize("case", ["no_l2norm_beta_high", "strong_decay", "g_zero_beta_low"])
@pytest.mark.parametrize("name", ["naive_recurrent_gated_delta_rule", "naive_chunk_gated_delta_rule"])
def test_gated_delta_rule_vs_fla_naive(name, case, seed):
    """fla's naive references have no l2norm option: run them on unit-norm keys (use_qk_l2norm=False)."""
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    args = make("gated_delta_rule", seed=seed, **(GDR_CASES[case] | dict(use_qk_l2norm=False)))
    args["scale"] = 0.3  # a custom scale, which both take
    q, k = _fla_layout(args)
    common = dict(scale=args["scale"], initial_state=args["initial_state"], output_final_state=True)
    if name == "naive_recurrent_gated_delta_rule":  # (q, k, v, beta, g): beta before g
        o, state = naive.naive_recurrent_gated_delta_rule(q, k, args["v"], args["beta"], args["g"], **common)
    else:
        o, state = naive.naive_chunk_gated_delta_rule(q, k, args["v"], args["g"], args["beta"], chunk_size=64,
                                                      **common)
    ref_o, ref_state = _reference_gdr(args)
    assert_close(o, ref_o, torch.float32, f"{name} o", seed)
    assert_close(state, ref_state, torch.float32, f"{name} state", seed)


LA_CASES = {
    "state": dict(T=130, initial_state=True),
    "no_gate": dict(T=70, gate=None, initial_state=True),
    "strong_decay": dict(T=100, gate="strong"),
    "T1": dict(T=1, initial_state=True),
}


@pytest.mark.parametrize("case", LA_CASES)
@pytest.mark.parametrize("name", ["naive_recurrent_simple_gla", "naive_chunk_simple_gla"])
def test_linear_attention_vs_fla_naive(name, case, seed):
    naive = pytest.importorskip("fla.ops.simple_gla.naive")
    args = make("linear_attention", seed=seed, **LA_CASES[case])
    q, k, v = args["q"], args["k"], args["v"]
    g = torch.zeros(q.shape[:3]) if args["g"] is None else args["g"]  # fla's naive versions need a gate tensor
    o, state = getattr(naive, name)(q, k, v, g, scale=0.3, initial_state=args["initial_state"],
                                    output_final_state=True)
    ref_o, ref_state = reference_linear_attention(**to_float64(args | dict(scale=0.3)))
    assert_close(o, ref_o, torch.float32, f"{name} o", seed)
    assert_close(state, ref_state, torch.float32, f"{name} state", seed)


ATTENTION_CASES = {
    "causal_gqa": dict(T=70, Hq=4, Hkv=2),
    "not_causal": dict(T=40, Tk=55, causal=False),
    "kv_cache_causal": dict(T=33, Tk=100, Hq=4, Hkv=1),
    "decode": dict(T=1, Tk=20),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_vs_sdpa(case, seed):
    """SDPA in float64 on repeated KV heads, with the bottom-right causal mask written out."""
    args = make("attention", dtype=torch.float64, seed=seed, **ATTENTION_CASES[case])
    q, k, v = (args[key].transpose(1, 2) for key in ("q", "k", "v"))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    Tq, Tk = q.shape[2], k.shape[2]
    mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq) if args["causal"] else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2).transpose(1, 2)
    assert_close(reference_attention(**args, scale=0.2), expected, torch.float64, "reference attention", seed)

"""model.layers.Linear's fast CPU paths (the compiled GEMV up to GEMV_ROWS rows, oneDNN's GEMM on a packed weight
above) against the float64 product, and its packed copy never stale."""
import pytest
import torch

from model.layers import GEMV_ROWS, Linear
from tests.helpers import rel_err


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _linear(seed, bias, in_features=160, out_features=72):
    torch.manual_seed(seed)
    layer = Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("rows", [1, 3, GEMV_ROWS, GEMV_ROWS + 1, 67])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_the_float64_product(one_thread, rows, bias, seed):
    layer = _linear(seed, bias)
    x = torch.randn(1, rows, layer.in_features)
    expected = x.double() @ layer.weight.double().T + (layer.bias.double() if bias else 0)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (1, rows, layer.out_features) and y.dtype == torch.float32
    assert rel_err(y, expected) < 1e-5, rel_err(y, expected)


def test_linear_non_contiguous_rows(one_thread, seed):
    layer = _linear(seed, False)
    x = torch.randn(2, 3 * layer.in_features)[:, ::3]  # a strided view
    with torch.no_grad():
        assert rel_err(layer(x), x.double() @ layer.weight.double().T) < 1e-5


def test_packed_weight_follows_writes_and_new_tensors(one_thread, seed):
    layer = _linear(seed, False)
    x = torch.randn(GEMV_ROWS + 5, layer.in_features)
    with torch.inference_mode():
        layer(x)  # packs the weight
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # an in-place write (an optimizer step)
    with torch.inference_mode():
        assert rel_err(layer(x), x.double() @ layer.weight.double().T) < 1e-5
    layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight))  # another tensor (load_state_dict(assign=True))
    with torch.inference_mode():
        assert rel_err(layer(x), x.double() @ layer.weight.double().T) < 1e-5
    layer.weight.data = torch.randn_like(layer.weight)  # new storage, same Parameter and version (Module.to)
    with torch.inference_mode():
        assert rel_err(layer(x), x.double() @ layer.weight.double().T) < 1e-5
    layer.half().float()
    with torch.inference_mode():
        assert rel_err(layer(x), x.double() @ layer.weight.double().T) < 1e-5


def test_gradients_take_torch_linear(one_thread, seed):
    layer = _linear(seed, True)
    x = torch.randn(2, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    assert rel_err(x.grad, layer.weight.sum(0).expand(2, -1)) < 1e-5 and layer._packed is None


def test_a_wrong_width_is_refused(one_thread, seed):
    layer = _linear(seed, False)
    with torch.inference_mode(), pytest.raises(RuntimeError):
        layer(torch.randn(1, layer.in_features + 1))


def test_inference_tensor_weights_are_not_packed(one_thread, seed):
    """An inference tensor has no version counter, so no pack could tell it was written: F.linear."""
    with torch.inference_mode():
        layer = _linear(seed, False)
        x = torch.randn(GEMV_ROWS + 5, layer.in_features)
        layer(x)
        layer.weight.mul_(-2.0)
        assert rel_err(layer(x), x.double() @ layer.weight.double().T) < 1e-5 and layer._packed is None

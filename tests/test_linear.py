"""components.Linear: nn.Linear's product, gradients and parameters, by oneDNN only where it is checked and defined."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyro_vae.components import MLP, Linear
from pyro_vae.components import linear as linear_module

ONEDNN = linear_module.onednn_linear_available()


def _layer(dtype: torch.dtype = torch.float32) -> Linear:
    torch.manual_seed(0)
    return Linear(400, 784).to(dtype)


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no checked oneDNN linear")
@pytest.mark.parametrize("shape", [(7, 400), (50, 3, 400), (1, 400)])
def test_without_gradients_it_is_the_float32_product_to_rounding(shape):
    layer = _layer()
    x = torch.randn(*shape)
    with torch.no_grad():
        got = layer(x)
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    blas = F.linear(x, layer.weight, layer.bias).detach()
    assert got.shape == exact.shape
    # The BLAS's own float32 rounding against the float64 product sets the scale of the allowed error.
    scale = (blas.double() - exact).abs().max()
    assert (got.double() - exact).abs().max() <= 4 * scale + 1e-6


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no checked oneDNN linear")
def test_a_transposed_input_gives_the_product_of_its_values():
    layer = _layer()
    x = torch.randn(400, 9).t()  # [9, 400], not contiguous
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x), F.linear(x.contiguous(), layer.weight, layer.bias), rtol=1e-5, atol=1e-4
        )


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no checked oneDNN linear")
def test_its_gradients_are_those_of_the_product_to_rounding():
    layer = _layer()
    x = torch.randn(6, 3, 400, requires_grad=True)
    upstream = torch.randn(6, 3, 784)
    (layer(x) * upstream).sum().backward()
    # d/dx = g W, d/dW = g^T x, d/db = sum g: the float64 products, to float32 rounding.
    g, rows = upstream.double().reshape(-1, 784), x.detach().double().reshape(-1, 400)
    expected = {
        "x": (g @ layer.weight.double()).reshape(x.shape),
        "weight": g.t() @ rows,
        "bias": g.sum(0),
    }
    for name, got in [("x", x.grad), ("weight", layer.weight.grad), ("bias", layer.bias.grad)]:
        torch.testing.assert_close(got.double(), expected[name], rtol=1e-4, atol=1e-3, msg=name)


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no checked oneDNN linear")
def test_second_derivatives_go_through_the_differentiable_backward():
    layer = Linear(300, 200)
    x = torch.randn(20, 300, requires_grad=True)  # 1.2M multiply-adds: the oneDNN path
    (grad_x,) = torch.autograd.grad((layer(x) ** 2).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad_x.sum(), x)
    # d/dx sum_j (d/dx_j sum_i y_i^2) = 2 1^T W^T W, the same for every row.
    expected = 2 * (layer.weight.t() @ layer.weight).sum(1).detach()
    torch.testing.assert_close(second, expected.expand(20, 300), rtol=1e-4, atol=1e-5)


def test_in_float64_it_is_exactly_f_linear():
    wide = _layer(torch.float64)
    x64 = torch.randn(5, 400, dtype=torch.float64, requires_grad=True)
    assert torch.equal(wide(x64), F.linear(x64, wide.weight, wide.bias))
    with torch.no_grad():
        assert torch.equal(wide(x64), F.linear(x64, wide.weight, wide.bias))


def test_its_state_dict_is_nn_linears():
    layer = _layer()
    plain = nn.Linear(400, 784)
    plain.load_state_dict(layer.state_dict())
    assert isinstance(layer, nn.Linear)
    assert all(isinstance(m, Linear) for m in MLP(50, [400], 784) if isinstance(m, nn.Linear))


def test_an_op_that_disagrees_is_refused_and_f_linear_runs(monkeypatch):
    wrong = lambda x, weight, bias, *args: F.linear(x, weight, bias) + 1e-3  # noqa: E731
    monkeypatch.setattr(linear_module, "_onednn_op", lambda: wrong)
    monkeypatch.setattr(linear_module, "_checked", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not linear_module.onednn_linear_available()
    assert any("disagreed" in str(w.message) for w in caught)
    layer = _layer()
    x = torch.randn(3, 400)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_an_op_that_fails_is_refused_with_a_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(linear_module, "_onednn_op", lambda: broken)
    monkeypatch.setattr(linear_module, "_checked", [])
    with pytest.warns(UserWarning, match="failed"):
        assert not linear_module.onednn_linear_available()


def test_a_frozen_weight_still_passes_the_bias_its_gradient():
    layer = _layer()
    layer.weight.requires_grad_(False)
    layer(torch.randn(4, 400)).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((784,), 4.0))
    assert layer.weight.grad is None


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no checked oneDNN linear")
@pytest.mark.filterwarnings("ignore:.*jit.trace.*:FutureWarning")  # deprecated, and what --jit uses today
def test_a_trace_records_the_product_as_one_operator_with_its_gradients():
    layer = _layer()
    x = torch.randn(5, 400, requires_grad=True)
    traced = torch.jit.trace(lambda x, w, b: layer(x).sum(), (x, layer.weight, layer.bias), check_trace=False)
    assert "pyro_vae::linear" in str(traced.graph)
    traced(x, layer.weight, layer.bias).backward()
    grads = x.grad.clone(), layer.weight.grad.clone()
    x.grad = layer.weight.grad = layer.bias.grad = None
    F.linear(x, layer.weight, layer.bias).sum().backward()
    torch.testing.assert_close(grads[0], x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1], layer.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no checked oneDNN linear")
def test_oneDNN_takes_the_large_products_and_f_linear_the_small_ones(monkeypatch):
    calls = []
    op = linear_module._onednn_op()
    monkeypatch.setattr(linear_module, "_onednn_op", lambda: lambda *a: calls.append(a[0].shape) or op(*a))
    layer = _layer()  # 400 -> 784
    small, large = torch.randn(2, 400), torch.randn(4, 400)  # 0.63M and 1.25M multiply-adds
    assert small.numel() * 784 < linear_module.ONEDNN_MIN_MACS <= large.numel() * 784
    with torch.no_grad():
        assert torch.equal(layer(small), F.linear(small, layer.weight, layer.bias))
        assert not calls
        layer(large)
    assert calls == [torch.Size([4, 400])]

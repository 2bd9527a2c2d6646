"""softplus and the Bernoulli log-density without log1p (components/softplus.py) against torch's own."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from pyro_vae.components import MLP, Softplus, bernoulli_logits_log_prob, softplus
from pyro_vae.components.distributions import IndependentBernoulli
from pyro_vae.errors import PyroVAEError


def _logits(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    # From far in both tails (|l| up to 60, where e^{-|l|} is below float64's resolution of 1) to 0.
    torch.manual_seed(0)
    return (torch.randn(*shape, dtype=dtype) * 20).clamp(-60, 60)


def test_softplus_matches_torch_in_float64_and_float32() -> None:
    x = torch.cat(
        [_logits(2000), torch.tensor([0.0, -0.0, 1e-12, -1e-12, 700.0, -700.0], dtype=torch.float64)]
    )
    expected = F.softplus(x, threshold=1e9)  # torch's exact formula everywhere, no linear cut-off
    assert torch.allclose(softplus(x), expected, rtol=1e-14, atol=3e-16)
    x32 = x.float()
    assert torch.allclose(softplus(x32).double(), expected, rtol=2e-7, atol=2e-7)
    assert torch.isfinite(softplus(torch.tensor([1e30, -1e30]))).all()


def test_bernoulli_log_prob_matches_binary_cross_entropy() -> None:
    logits = _logits(50, 784)
    torch.manual_seed(1)
    binary = (torch.rand(50, 784, dtype=torch.float64) < 0.3).double()
    grey = torch.rand(50, 784, dtype=torch.float64)  # the formula holds for any value in [0, 1]
    for value in (binary, grey):
        expected = -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)
        assert torch.allclose(bernoulli_logits_log_prob(logits, value), expected, rtol=1e-13, atol=1e-11)
    # float32 is summed over 784 pixels of up to 60 nats each: float rounding of the sum, not a formula error.
    expected = -F.binary_cross_entropy_with_logits(logits, binary, reduction="none").sum(-1)
    got32 = bernoulli_logits_log_prob(logits.float(), binary.float()).double()
    assert torch.allclose(got32, expected, rtol=1e-5, atol=1e-3)


def test_hand_written_gradients_agree_with_finite_differences_to_second_order() -> None:
    torch.manual_seed(2)
    logits = (torch.randn(3, 7, dtype=torch.float64) * 4).requires_grad_()
    value = torch.rand(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bernoulli_logits_log_prob, (logits, value))
    assert torch.autograd.gradgradcheck(bernoulli_logits_log_prob, (logits, value))
    assert torch.autograd.gradcheck(softplus, (logits,))
    assert torch.autograd.gradgradcheck(softplus, (logits,))


def test_backward_matches_autograd_of_torch_formula() -> None:
    logits = _logits(40, 784).requires_grad_()
    value = (torch.rand(40, 784, dtype=torch.float64) < 0.5).double()
    ours = torch.autograd.grad(bernoulli_logits_log_prob(logits, value).sum(), logits)[0]
    theirs = torch.autograd.grad(
        -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(), logits
    )[0]
    assert torch.allclose(ours, theirs, rtol=1e-13, atol=1e-15)
    ours = torch.autograd.grad(softplus(logits).sum(), logits)[0]
    theirs = torch.autograd.grad(F.softplus(logits, threshold=1e9).sum(), logits)[0]
    assert torch.allclose(ours, theirs, rtol=1e-13, atol=1e-15)


def test_traced_functions_give_the_same_values_and_gradients() -> None:
    # torch.jit.trace (Pyro's JitTrace_ELBO) records each function as one operation with its own backward.
    logits = _logits(5, 16).requires_grad_()
    value = (torch.rand(5, 16, dtype=torch.float64) < 0.5).double()
    traced = torch.jit.trace(lambda t: bernoulli_logits_log_prob(t, value) + softplus(t).sum(-1), (logits,))
    eager = bernoulli_logits_log_prob(logits, value) + softplus(logits).sum(-1)
    again = traced(logits)
    assert torch.allclose(again, eager, rtol=1e-14)
    assert torch.allclose(
        torch.autograd.grad(again.sum(), logits)[0], torch.autograd.grad(eager.sum(), logits)[0], rtol=1e-13
    )


def test_independent_bernoulli_uses_it_and_matches_pyros_bernoulli() -> None:
    import pyro.distributions as dist

    logits = _logits(4, 3, 10)
    value = (torch.rand(4, 3, 10, dtype=torch.float64) < 0.5).double()
    expected = dist.Bernoulli(logits=logits).to_event(1).log_prob(value)
    assert torch.allclose(IndependentBernoulli(logits).log_prob(value), expected, rtol=1e-13)
    # One value broadcast against many logits (particles x data), as the evaluators call it.
    assert torch.allclose(
        IndependentBernoulli(logits).log_prob(value[0]),
        dist.Bernoulli(logits=logits).to_event(1).log_prob(value[0]),
        rtol=1e-13,
    )


def test_softplus_module_is_a_drop_in_for_torchs() -> None:
    torch.manual_seed(3)
    ours = MLP(6, [5, 4], 3)
    assert any(isinstance(layer, Softplus) for layer in ours)
    theirs = MLP(6, [5, 4], 3, activation=torch.nn.Softplus)
    theirs.load_state_dict(ours.state_dict())  # no parameters of its own: the same state dict
    x = torch.randn(2, 6)
    assert torch.allclose(ours(x), theirs(x), rtol=1e-6, atol=1e-7)


def test_refuses_logits_and_values_of_different_shapes() -> None:
    with pytest.raises(PyroVAEError, match="one shape"):
        bernoulli_logits_log_prob(torch.zeros(3, 4), torch.zeros(4))

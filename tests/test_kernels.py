"""Fused (torch.compile) log-densities give the eager values; the evaluator gives the same bounds with either."""

from __future__ import annotations

import shutil
import warnings

import pyro
import pytest
import torch
from torch.nn import functional as F

from pyro_vae import ModelConfig, build_vae, evaluate_bounds, load_dataset, prepare_split
from pyro_vae.components import kernels
from pyro_vae.components.distributions import bernoulli_event_log_prob

# Inductor builds CPU kernels with a C++ compiler; without one the fused path falls back (with a warning).
HAVE_COMPILER = shutil.which("g++") is not None or shutil.which("c++") is not None


def test_outside_the_block_the_eager_function_runs():
    logits, x = torch.randn(3, 5), torch.bernoulli(torch.full((3, 5), 0.5))
    assert torch.equal(bernoulli_event_log_prob(logits, x), bernoulli_event_log_prob.eager(logits, x))
    with kernels.compiled_kernels(False):
        assert torch.equal(bernoulli_event_log_prob(logits, x), bernoulli_event_log_prob.eager(logits, x))


@pytest.mark.skipif(not HAVE_COMPILER, reason="needs a C++ compiler for TorchInductor's CPU kernels")
def test_compiled_bernoulli_log_prob_equals_eager_for_every_shape():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to eager would warn: fail instead of passing vacuously
        with kernels.compiled_kernels():
            for shape in [(7, 64), (3, 11, 64), (2, 5, 784)]:  # one dynamic kernel for all of them
                logits = 10 * torch.randn(shape)
                x = torch.bernoulli(torch.full(shape, 0.3))
                torch.testing.assert_close(
                    bernoulli_event_log_prob(logits, x),
                    bernoulli_event_log_prob.eager(logits, x),
                    rtol=1e-5,
                    atol=1e-4,
                )
    assert not kernels._failed


@pytest.mark.skipif(not HAVE_COMPILER, reason="needs a C++ compiler for TorchInductor's CPU kernels")
def test_evaluator_bounds_are_the_same_with_the_fused_kernel():
    x = prepare_split(load_dataset("digits"), "test", mode="static")[:20]
    vae = build_vae(ModelConfig(data_dim=64, latent_dims=(3,), hidden_dims=(32,)))
    results = []
    for fuse in (False, True):
        pyro.set_rng_seed(4)
        results.append(evaluate_bounds(vae.model, vae.guide, x, num_samples=200, chunk_size=50, compile=fuse))
    plain, fused = results
    torch.testing.assert_close(fused.log_px, plain.log_px, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(fused.elbo, plain.elbo, rtol=1e-6, atol=1e-5)


def test_auto_compiles_only_large_evaluations(monkeypatch):
    seen = []
    real = kernels.compiled_kernels

    def spy(enabled=True):
        seen.append(enabled)
        return real(False)  # record the decision, run eagerly

    monkeypatch.setattr("pyro_vae.inference.importance.compiled_kernels", spy)
    monkeypatch.setattr("pyro_vae.inference.importance.AUTO_ROWS", 1000)
    x = prepare_split(load_dataset("digits"), "test", mode="static")
    vae = build_vae(ModelConfig(data_dim=64, latent_dims=(3,), hidden_dims=(32,)))
    evaluate_bounds(vae.model, vae.guide, x[:4], num_samples=100, diagnostics=False)  # 400 rows
    evaluate_bounds(vae.model, vae.guide, x[:20], num_samples=100, diagnostics=False)  # 2000 rows
    evaluate_bounds(vae.model, vae.guide, x[:20], num_samples=100, diagnostics=False, compile=False)
    assert seen == [False, True, False]


@pytest.mark.skipif(not HAVE_COMPILER, reason="needs a C++ compiler for TorchInductor's CPU kernels")
def test_the_fused_softplus_of_an_evaluation_is_torchs_softplus():
    from pyro_vae.components import softplus

    torch.manual_seed(1)
    for shape in [(5, 3), (40, 7, 11), (1,)]:
        x = torch.randn(*shape) * 30
        expected = F.softplus(x.double(), threshold=1e9)
        with torch.no_grad(), kernels.compiled_kernels():
            fused = softplus(x)
        torch.testing.assert_close(fused.double(), expected, rtol=2e-7, atol=2e-7)
        with kernels.compiled_kernels():  # with a gradient to take, the hand-written backward's form runs
            y = x.clone().requires_grad_(True)
            softplus(y).sum().backward()
            torch.testing.assert_close(y.grad, torch.sigmoid(x))
    assert not kernels._failed

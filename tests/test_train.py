"""Training: the device-resident ELBO equals Pyro's, SVI improves the fit, runs are reproducible."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_vae import ModelConfig, build_vae, fit, load_dataset, make_loss, mean_elbo, prepare_split
from pyro_vae.objectives import DeviceTrace_ELBO
from pyro_vae.training.loop import resolve_device

from .conftest import requires_cuda


@pytest.fixture(scope="module")
def digits():
    dataset = load_dataset("digits")
    return prepare_split(dataset, "train", mode="static"), prepare_split(dataset, "test", mode="static")


def small_vae(data_dim=64):
    return build_vae(ModelConfig(data_dim=data_dim, latent_dims=(4,), hidden_dims=(32,)))


@pytest.mark.parametrize("num_particles", [1, 4])
def test_device_elbo_equals_pyro_trace_elbo(num_particles, digits):
    x = digits[0][:16]
    vae = small_vae()
    reference = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    ours = make_loss("elbo", num_particles=num_particles)
    values, grads = [], []
    for loss in (reference, ours):
        pyro.set_rng_seed(3)
        vae.zero_grad()
        value = loss.differentiable_loss(vae.model, vae.guide, x, num_data=100)
        value.backward()
        values.append(value.detach())
        grads.append([p.grad.clone() for p in vae.parameters()])
    torch.testing.assert_close(values[0], values[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_device_elbo_keeps_the_score_function_for_discrete_latents():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.3))
            pyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)

    logit = torch.tensor(0.2, requires_grad=True)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=logit))

    x = torch.tensor([0.1, 1.9, 2.2])
    results = []
    for loss in (
        Trace_ELBO(num_particles=5, vectorize_particles=True),
        DeviceTrace_ELBO(num_particles=5, vectorize_particles=True),
    ):
        pyro.set_rng_seed(1)
        logit.grad = None
        value = loss.differentiable_loss(model, guide, x)
        value.backward()
        results.append((float(value.detach()), float(logit.grad)))
    assert results[0] == pytest.approx(results[1])
    assert (
        results[0][1] != 0.0
    )  # the gradient flows through the score function, not the (absent) reparameterization


def test_fit_improves_the_elbo_and_records_history(digits):
    train, test = digits
    vae = small_vae()
    before = mean_elbo(vae, test)
    result = fit(vae, train, test=test, epochs=4, batch_size=64, lr=3e-3, progress=False)
    assert [r.epoch for r in result.history] == [1, 2, 3, 4]
    assert all(r.seconds > 0 and r.test_elbo is not None for r in result.history)
    after = mean_elbo(vae, test, num_particles=10)
    assert after > before + 5.0, (before, after)
    # Per-datum nats: a 64-pixel binary image costs at most 64 ln 2 = 44 nats under a fair coin.
    assert -45.0 < result.final.test_elbo < 0
    assert result.history[-1].train_elbo > result.history[0].train_elbo


def test_same_seed_gives_identical_parameters(digits):
    train, _ = digits
    states = []
    for _ in range(2):
        pyro.set_rng_seed(0)
        vae = small_vae()
        fit(vae, train, epochs=2, batch_size=100, seed=5, dynamic_binarization=False, progress=False)
        states.append(vae.state_dict())
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name


def test_a_stale_param_store_cannot_hijack_training(digits):
    train, _ = digits
    stale = small_vae()
    stale.model(train[:2])  # leaves decoder$$$... params in the global store
    vae = small_vae()
    first = vae.decoder[0].weight.detach().clone()
    fit(vae, train, epochs=1, batch_size=128, progress=False)
    assert not torch.equal(first, vae.decoder[0].weight)


def test_dynamic_binarization_trains_on_grey_data():
    dataset = load_dataset("digits")
    vae = small_vae()
    grey = dataset.train
    with pytest.raises(ValueError, match="--binarize dynamic"):
        fit(vae, grey, epochs=1, progress=False)
    result = fit(vae, grey, epochs=1, dynamic_binarization=True, progress=False)
    assert torch.isfinite(torch.tensor(result.final.train_elbo))


def test_fit_rejects_bad_arguments(digits):
    train, _ = digits
    vae = small_vae()
    with pytest.raises(ValueError, match="larger than the"):
        fit(vae, train[:10], batch_size=20, progress=False)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        fit(vae, train, epochs=0, progress=False)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        fit(vae, train, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="non-empty 2-D tensor"):
        fit(vae, train[0], progress=False)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        fit(vae, train.numpy(), progress=False)
    with pytest.raises(ValueError, match="built for 10 values per data point, but the data have 64"):
        fit(small_vae(data_dim=10), train, progress=False)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


@requires_cuda
def test_training_on_cuda(digits):
    train, test = digits
    vae = small_vae()
    result = fit(vae, train, test=test, epochs=3, batch_size=64, lr=3e-3, device="cuda", progress=False)
    assert result.device.type == "cuda"
    assert all(p.is_cuda for p in vae.parameters())
    assert result.history[-1].test_elbo > result.history[0].test_elbo
    # The CUDA model agrees with itself moved to the CPU.
    x = test[:50]
    pyro.set_rng_seed(0)
    on_gpu = mean_elbo(vae, x.cuda(), num_particles=2000)
    vae.cpu()
    on_cpu = mean_elbo(vae, x, num_particles=2000)
    assert on_gpu == pytest.approx(on_cpu, abs=0.1)

"""The parts of the training loop: state, feeders, hooks, the options written once, and fit on any model."""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyro_vae import ModelConfig, TrainConfig, build_vae, data_plate, fit, load_dataset, prepare_split
from pyro_vae.errors import PyroVAEError, PyroVAETypeError
from pyro_vae.training.distributed import DataParallel, Shard, Stream, derive_seed
from pyro_vae.training.feeding import Sharded, SingleProcess, make_feeder
from pyro_vae.training.hooks import Hook, NaNGuard
from pyro_vae.training.state import EpochRecord, TrainingState, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def digits():
    return prepare_split(load_dataset("digits"), "train", mode="static")[:200]


def small_vae():
    return build_vae(ModelConfig(data_dim=64, latent_dims=(3,), hidden_dims=(16,)))


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class UserVAE(nn.Module):
    """A VAE written as a user would, with no likelihood object: z ~ N(0, I), x ~ Bernoulli(logits = f(z))."""

    guide_site = "z"  # the name the guide draws z under

    def __init__(self, data_dim: int = 64, latent_dim: int = 2) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder = nn.Linear(latent_dim, data_dim)
        self.encoder = nn.Linear(data_dim, 2 * latent_dim)

    def model(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("decoder", self.decoder)
        with data_plate(x, num_data):
            z = pyro.sample(
                "z",
                dist.Normal(x.new_zeros(self.latent_dim), 1.0)
                .expand([x.shape[0], self.latent_dim])
                .to_event(1),
            )
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, *, num_data: int | None = None) -> None:
        pyro.module("encoder", self.encoder)
        loc, raw_scale = self.encoder(x).chunk(2, dim=-1)
        with data_plate(x, num_data):
            pyro.sample(self.guide_site, dist.Normal(loc, F.softplus(raw_scale) + 1e-4).to_event(1))


class RenamedGuide(UserVAE):
    """The guide draws its latent under another name ("w") than the model's ("z"): a silent wrong ELBO."""

    guide_site = "w"


class ChecksItsData(UserVAE):
    """A user's model with its own data check (the ChecksData ability)."""

    def check_data(self, x: torch.Tensor) -> None:
        if x.sum() > 0:
            raise PyroVAEError("this model only scores blank images")


class Recorder(Hook):
    """Writes down every event it is called for, with the step count at the time."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def on_fit_start(self, loop):
        self.events.append(("fit_start", loop.state.step))

    def on_epoch_start(self, loop):
        self.events.append(("epoch_start", loop.state.step))

    def on_step_start(self, loop):
        self.events.append(("step_start", loop.state.step))

    def on_step_end(self, loop, loss):
        assert loss.dim() == 0
        self.events.append(("step_end", loop.state.step))

    def on_epoch_steps_end(self, loop):
        self.events.append(("epoch_steps_end", loop.state.step))

    def on_epoch_end(self, loop, record):
        assert record.epoch == loop.state.epoch - 1  # the state already stands at the next epoch
        self.events.append(("epoch_end", loop.state.step))

    def on_save(self, loop):
        self.events.append(("save", loop.state.step))

    def on_fit_end(self, loop):
        self.events.append(("fit_end", loop.state.step))


# ---------------------------------------------------------------------------------------------------------
# The state


def test_training_state_round_trips_through_a_checkpoint_exactly(tmp_path):
    state = TrainingState.start(device=torch.device("cpu"))
    state.order = torch.randperm(50)
    for loss, size in ((123.456789, 16), (98.7654321, 16), (77.1, 7)):
        state.add_step(torch.tensor(loss), size=size, num_data=50)
    state.history.append(EpochRecord(1, -40.5, None, 0.25))
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, **state.to_checkpoint()})
    back = TrainingState.from_checkpoint(load_checkpoint(path), device=torch.device("cpu"))
    assert (back.epoch, back.done, back.step, back.seen) == (1, 3, 3, 39)
    assert torch.equal(back.order, state.order)
    assert back.epoch_loss.dtype == torch.float64 and torch.equal(back.epoch_loss, state.epoch_loss)
    assert back.history == state.history


def test_finishing_an_epoch_records_it_and_starts_the_next():
    state = TrainingState.start(device=torch.device("cpu"))
    state.order = torch.arange(4)
    state.add_step(torch.tensor(10.0), size=4, num_data=4)
    record = EpochRecord(1, -10.0, -11.0, 0.1)
    state.finish_epoch(record)
    assert (state.epoch, state.done, state.step, state.seen, state.order) == (2, 0, 1, 0, None)
    assert float(state.epoch_loss) == 0.0 and state.history == [record]


# ---------------------------------------------------------------------------------------------------------
# The feeders


def test_the_single_process_feeder_gives_a_fresh_permutation_each_epoch(digits):
    config = TrainConfig(batch_size=64)
    feeder = make_feeder(digits, config, dynamic_binarization=True, device=torch.device("cpu"))
    assert isinstance(feeder, SingleProcess) and feeder.samples_per_epoch == 200
    state = TrainingState.start(device=torch.device("cpu"))
    torch.manual_seed(3)
    minibatches = feeder.epoch(state)
    fed = feeder.feed(minibatches[0], step=0)
    torch.manual_seed(3)
    order = torch.randperm(200)
    expected = torch.bernoulli(digits[order[:64]])
    assert [len(b) for b in minibatches] == [64, 64, 64, 8]
    assert torch.equal(torch.cat(list(minibatches)), order) and torch.equal(fed, expected)
    torch.manual_seed(99)
    again = feeder.epoch(state)  # the epoch's order is drawn once and kept in the state (for resume)
    assert torch.equal(torch.cat(list(again)), order)
    assert feeder.step_loss(torch.tensor(1.0), fed) == (torch.tensor(1.0), 64)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_the_sharded_feeder_gives_each_shard_its_part_and_its_stream(digits, shards):
    config = TrainConfig(batch_size=64, shards=shards, seed=7)
    feeder = make_feeder(digits, config, dynamic_binarization=False, device=torch.device("cpu"))
    assert isinstance(feeder, Sharded) and feeder.rng_state() is None
    state = TrainingState.start(device=torch.device("cpu"))
    state.epoch = 2
    minibatches = feeder.epoch(state)
    parallel = DataParallel(shards=shards, seed=7, device=torch.device("cpu"))
    expected = parallel.minibatches(200, batch_size=64, epoch=2)
    assert len(minibatches) == len(expected) == -(-feeder.samples_per_epoch // 64)
    for got, want in zip(minibatches, expected, strict=True):
        assert [s for s, _ in got] == [s for s, _ in want]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want, strict=True))
    fed = feeder.feed(minibatches[1], step=5)
    assert [shard.index for shard in fed] == list(range(shards))
    assert all(isinstance(shard, Shard) for shard in fed)
    assert [shard.seed for shard in fed] == [derive_seed(7, Stream.TRAIN, 5, s) for s in range(shards)]
    assert all(torch.equal(shard.x, digits[i]) for shard, (_, i) in zip(fed, minibatches[1], strict=True))


# ---------------------------------------------------------------------------------------------------------
# The hooks


def test_hooks_are_called_in_order(digits, tmp_path):
    recorder = Recorder()
    fit(
        small_vae(),
        digits[:96],
        epochs=2,
        batch_size=32,
        hooks=[recorder],
        progress=False,
        checkpoint=tmp_path / "checkpoint.pt",
    )

    def epoch(first: int) -> list[tuple[str, int]]:
        """The events of an epoch of three steps that starts after step ``first``."""
        steps = [
            event for k in range(3) for event in (("step_start", first + k), ("step_end", first + k + 1))
        ]
        # The checkpoint hook (built in, so called before ours) saves at the end of the epoch.
        return [
            ("epoch_start", first),
            *steps,
            ("epoch_steps_end", first + 3),
            ("save", first + 3),
            ("epoch_end", first + 3),
        ]

    assert recorder.events == [("fit_start", 0), *epoch(0), *epoch(3), ("fit_end", 6)]


def test_fit_end_is_called_when_a_hook_stops_training(digits):
    class Stop(Recorder):
        def on_step_end(self, loop, loss):
            super().on_step_end(loop, loss)
            if loop.state.step == 2:
                raise RuntimeError("stop here")

    stop = Stop()
    with pytest.raises(RuntimeError, match="stop here"):
        fit(small_vae(), digits, epochs=1, batch_size=32, hooks=[stop], progress=False)
    assert stop.events[-2:] == [("step_end", 2), ("fit_end", 2)]


# ---------------------------------------------------------------------------------------------------------
# The options, written once in TrainConfig


def test_every_training_option_is_a_keyword_of_fit_with_the_same_default():
    parameters = inspect.signature(fit).parameters
    for option in dataclasses.fields(TrainConfig):
        assert option.metadata["help"], option.name
        assert parameters[option.name].kind is inspect.Parameter.KEYWORD_ONLY, option.name
        assert parameters[option.name].default == option.default, option.name


def test_fit_with_a_whole_config_equals_fit_with_its_keywords(digits):
    options = dict(epochs=2, batch_size=50, lr=3e-3, num_particles=2, beta=2.0, clip_norm=5.0, seed=4)
    results = []
    for call in ({"config": TrainConfig(**options)}, options):
        pyro.set_rng_seed(0)
        vae = small_vae()
        result = fit(vae, digits, progress=False, **call)
        results.append((weights(vae), result.history, result.config))
    (w1, h1, c1), (w2, h2, c2) = results
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert [(r.train_elbo, r.test_elbo) for r in h1] == [(r.train_elbo, r.test_elbo) for r in h2]
    assert c1 == c2 == TrainConfig(**options)


def test_a_keyword_that_contradicts_the_config_is_refused(digits):
    config = TrainConfig(epochs=1, batch_size=50, lr=3e-3)
    with pytest.raises(PyroVAEError, match=r"lr=0\.01 \(the config has 0\.003\)"):
        fit(small_vae(), digits, config=config, lr=0.01, progress=False)
    with pytest.raises(PyroVAEError, match="epochs=3"):
        fit(small_vae(), digits, config=config, epochs=3, progress=False)
    with pytest.raises(PyroVAETypeError, match="config must be a TrainConfig"):
        fit(small_vae(), digits, config={"epochs": 1}, progress=False)
    # Agreeing with the config is not a conflict, and device= overrides the config's device.
    result = fit(small_vae(), digits, config=config, lr=3e-3, device=torch.device("cpu"), progress=False)
    assert result.config == dataclasses.replace(config, device="cpu")


# ---------------------------------------------------------------------------------------------------------
# fit on any model of the contract


def test_fit_trains_a_users_model_without_a_likelihood(digits):
    model = UserVAE()
    assert not hasattr(model, "likelihood")
    before = weights(model)
    result = fit(model, digits, epochs=2, batch_size=50, lr=1e-2, progress=False)
    assert len(result.history) == 2 and all(
        torch.isfinite(torch.tensor(r.train_elbo)) for r in result.history
    )
    assert all(not torch.equal(before[k], v) for k, v in weights(model).items())
    assert result.vae is model


def test_fit_refuses_a_mismatched_guide_before_any_step(digits):
    model, recorder = RenamedGuide(), Recorder()
    before = weights(model)
    with pytest.raises(PyroVAEError, match=r"the guide does not match the model.*'z'.*'w'"):
        fit(model, digits, epochs=1, batch_size=50, hooks=[recorder], progress=False)
    assert recorder.events == []
    assert all(torch.equal(before[k], v) for k, v in weights(model).items())


def test_fit_uses_the_models_own_data_check(digits):
    with pytest.raises(PyroVAEError, match="only scores blank images"):
        fit(ChecksItsData(), digits, epochs=1, batch_size=50, progress=False)


@pytest.mark.parametrize("bad", [None, object(), nn.Linear(2, 2)])
def test_fit_refuses_what_is_not_a_model_of_the_contract(bad, digits):
    with pytest.raises(PyroVAETypeError, match=r"model\(x, \*, num_data=None\) and guide"):
        fit(bad, digits, epochs=1, progress=False)


def test_a_user_models_description_is_kept_in_the_checkpoint_and_checked_on_resume(digits, tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    description = {"class": "tests.UserVAE", "options": {"latent_dim": 2}}
    options = dict(batch_size=50, checkpoint=checkpoint, model_config=description, progress=False)
    fit(UserVAE(), digits, epochs=1, **options)
    assert load_checkpoint(checkpoint)["model_config"] == description
    resumed = fit(UserVAE(), digits, epochs=2, resume=True, **options)
    assert [r.epoch for r in resumed.history] == [1, 2]
    with pytest.raises(PyroVAEError, match=r"differs in: model\.options"):
        fit(
            UserVAE(),
            digits,
            epochs=3,
            resume=True,
            **{**options, "model_config": {**description, "options": {}}},
        )
    with pytest.raises(PyroVAETypeError, match="model_config must be"):
        fit(UserVAE(), digits, epochs=1, batch_size=50, model_config="UserVAE", progress=False)


def test_the_nan_guard_reads_back_only_at_sync_steps_and_names_the_first_bad_step():
    loop = SimpleNamespace(
        device=torch.device("cpu"), state=TrainingState.start(device=torch.device("cpu")), checkpoint=None
    )
    guard = NaNGuard()
    guard.on_fit_start(loop)
    for loss in (1.0, float("nan"), float("inf"), 2.0):
        loop.state.add_step(torch.tensor(loss), size=1, num_data=1)
        loop.at_sync = False  # a GPU step between refreshes: nothing is read back
        guard.on_step_end(loop, torch.tensor(loss))
    with pytest.raises(FloatingPointError, match=r"at step 2 \(epoch 1\); no checkpoint was written"):
        guard.on_save(loop)  # and never a checkpoint after a bad step

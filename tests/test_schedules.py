"""What reproductions need in training (issue 15, item 4): learning-rate schedules, a validation split that
never overlaps the training points, a validation score every N epochs and the best weights kept."""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import torch
from torch import nn

from pyro_vae import DataConfig, ModelConfig, TrainConfig, build_vae, fit, load_dataset, prepare_split
from pyro_vae.cli import main
from pyro_vae.errors import PyroVAEError
from pyro_vae.io.data import Dataset, hold_out
from pyro_vae.training.distributed import Stream, derive_seed, seeded
from pyro_vae.training.hooks import Hook
from pyro_vae.training.schedules import burda_stage, learning_rate
from pyro_vae.training.state import load_checkpoint, load_weights, save_checkpoint
from pyro_vae.training.validation import is_validation_epoch, validation_score

SMALL = ["--hidden-dims", "16", "--latent-dims", "3", "--batch-size", "64", "--eval-samples", "0"]


@pytest.fixture(scope="module")
def digits():
    return prepare_split(load_dataset("digits"), "train", mode="static")[:200]


def small_vae(seed: int = 0):
    torch.manual_seed(seed)
    return build_vae(ModelConfig(data_dim=64, latent_dims=(3,), hidden_dims=(16,)))


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------
# Schedules: the rates are the published formulas, and torch's schedulers agree


def test_burda_stages_last_3_to_the_i_epochs():
    # Stage i covers epochs (3^i + 1) / 2 .. (3^(i+1) - 1) / 2: 1 | 2-4 | 5-13 | 14-40 | ... | 1094-3280.
    ends = [(3 ** (i + 1) - 1) // 2 for i in range(8)]
    assert ends == [1, 4, 13, 40, 121, 364, 1093, 3280]
    for i, end in enumerate(ends):
        assert burda_stage(end) == i
        assert burda_stage(end + 1) == min(i + 1, 7)  # after 3,280 epochs the last stage holds
    assert sum(3**i for i in range(8)) == 3280


def test_burda_rate_falls_by_ten_to_the_minus_one_seventh_per_stage():
    config = TrainConfig(lr=1e-3, lr_schedule="burda", epochs=3280)
    for epoch, stage in [(1, 0), (2, 1), (4, 1), (5, 2), (40, 3), (41, 4), (364, 5), (1093, 6), (3280, 7)]:
        assert learning_rate(config, epoch) == pytest.approx(1e-3 * 10 ** (-stage / 7), rel=1e-12)
    assert learning_rate(config, 3280) == pytest.approx(1e-4, rel=1e-12)  # the last stage: lr / 10


def test_burda_matches_torch_lambda_lr():
    config = TrainConfig(lr=1e-3, lr_schedule="burda", epochs=200)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    # torch's LambdaLR with Burda et al.'s factor written independently: the stage is floor(log3(2e + 1)).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: 10 ** (-min(7, math.floor(math.log(2 * e + 1, 3) + 1e-9)) / 7)
    )
    for epoch in range(1, 201):
        assert learning_rate(config, epoch) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_step_and_cosine_match_torch_schedulers():
    for config, make in [
        (
            TrainConfig(lr=2e-3, lr_schedule="step", lr_step_epochs=3, lr_gamma=0.5, epochs=20),
            lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
        ),
        (
            TrainConfig(lr=2e-3, lr_schedule="cosine", lr_min=1e-5, epochs=20),
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=1e-5),
        ),
    ]:
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2e-3)
        scheduler = make(optimizer)
        for epoch in range(1, 21):
            assert learning_rate(config, epoch) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
            optimizer.step()
            scheduler.step()


def test_step_and_cosine_closed_forms():
    step = TrainConfig(lr=1.0, lr_schedule="step", lr_step_epochs=2, lr_gamma=0.1, epochs=6)
    assert [learning_rate(step, e) for e in range(1, 7)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = TrainConfig(lr=1.0, lr_schedule="cosine", epochs=4)
    assert [learning_rate(cosine, e) for e in range(1, 5)] == pytest.approx(
        [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]
    )
    assert learning_rate(TrainConfig(lr=3e-4), 1000) == 3e-4  # constant


@pytest.mark.parametrize(
    "options,message",
    [
        ({"lr_schedule": "exponential"}, "lr_schedule must be one of constant, burda, step, cosine"),
        ({"lr_schedule": "step"}, "needs --lr-step-epochs"),
        ({"lr_schedule": "step", "lr_step_epochs": 0}, "lr_step_epochs must be a positive integer"),
        (
            {"lr_schedule": "cosine", "lr_step_epochs": 5},
            "--lr-step-epochs is an option of --lr-schedule step",
        ),
        ({"lr_schedule": "step", "lr_step_epochs": 2, "lr_gamma": 0}, "lr_gamma must be a number in (0, 1]"),
        (
            {"lr_schedule": "step", "lr_step_epochs": 2, "lr_gamma": 2.0},
            "lr_gamma must be a number in (0, 1]",
        ),
        ({"lr_gamma": 0.5}, "--lr-gamma is an option of --lr-schedule step"),
        ({"lr_schedule": "cosine", "lr_min": 1e-3}, "lr_min must be a number from 0 up to"),
        ({"lr_min": 1e-5}, "--lr-min is an option of --lr-schedule cosine"),
        ({"lr_schedule": "burda", "fused_adam": False}, "drop --no-fused-adam"),
        ({"eval_every": 0}, "eval_every must be a positive integer"),
        ({"valid_samples": 0}, "valid_samples must be a positive integer"),
    ],
)
def test_bad_schedule_and_validation_settings_are_refused(options, message):
    with pytest.raises(PyroVAEError, match=None) as error:
        TrainConfig(lr=1e-3, **options)
    assert message in str(error.value)


def test_epochs_are_counted_from_one():
    with pytest.raises(PyroVAEError, match="counted from 1"):
        learning_rate(TrainConfig(lr_schedule="burda"), 0)


class RecordRates(Hook):
    """The optimizer's rate during each epoch (read at its end)."""

    def __init__(self) -> None:
        self.rates: dict[int, float] = {}

    def on_epoch_steps_end(self, loop) -> None:
        self.rates[loop.state.epoch] = loop.optimizer.optimizer.param_groups[0]["lr"]


def test_fit_steps_with_the_rate_of_each_epoch(digits):
    recorder = RecordRates()
    config = TrainConfig(epochs=5, batch_size=50, lr_schedule="burda", device="cpu")
    fit(small_vae(), digits, config=config, progress=False, hooks=[recorder])
    assert recorder.rates == pytest.approx({e: learning_rate(config, e) for e in range(1, 6)}, rel=1e-12)
    assert recorder.rates[1] > recorder.rates[2] == recorder.rates[4] > recorder.rates[5]


def test_a_resumed_scheduled_run_ends_with_the_weights_of_an_uninterrupted_one(digits, tmp_path):
    # The checkpoint after epoch 2 holds epoch 2's rate; epoch 3 must step with its own (step: 0.5x).
    config = TrainConfig(
        epochs=4, batch_size=50, lr_schedule="step", lr_step_epochs=2, lr_gamma=0.5, device="cpu"
    )
    whole = small_vae()
    fit(whole, digits, config=config, progress=False)
    parted = small_vae()
    fit(
        parted,
        digits,
        config=dataclasses.replace(config, epochs=2),
        checkpoint=tmp_path / "c.pt",
        progress=False,
    )
    resumed = small_vae()
    fit(resumed, digits, config=config, checkpoint=tmp_path / "c.pt", resume=True, progress=False)
    for name, value in weights(whole).items():
        assert torch.equal(value, weights(resumed)[name]), name


def test_a_cosine_run_resumes_only_with_its_epochs(digits, tmp_path):
    config = TrainConfig(epochs=2, batch_size=100, lr_schedule="cosine", device="cpu")
    fit(small_vae(), digits, config=config, checkpoint=tmp_path / "c.pt", progress=False)
    with pytest.raises(PyroVAEError, match="the cosine schedule spans the run's --epochs, 2"):
        fit(
            small_vae(),
            digits,
            config=dataclasses.replace(config, epochs=4),
            checkpoint=tmp_path / "c.pt",
            resume=True,
            progress=False,
        )


# ---------------------------------------------------------------------------
# The validation split


def _toy(n: int = 50, *, valid: bool = False) -> Dataset:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)  # row i holds i: rows are traceable
    return Dataset(
        name="toy",
        train=x,
        test=x[:5].clone(),
        image_shape=None,
        train_labels=torch.arange(n),
        valid=x[:4].clone() if valid else None,
    )


def test_hold_out_never_overlaps_and_covers_the_training_points():
    data = _toy(50)
    for size, count in [(10, 10), (0.2, 10), (1, 1), (49, 49), (0.001, 1)]:
        split = hold_out(data, size)
        train_ids, valid_ids = set(split.train[:, 0].tolist()), set(split.valid[:, 0].tolist())
        assert len(valid_ids) == count and len(train_ids) == 50 - count
        assert train_ids.isdisjoint(valid_ids) and train_ids | valid_ids == set(range(50))
        assert torch.equal(split.train_labels.float(), split.train[:, 0])  # labels follow their rows
        assert torch.equal(split.valid_labels.float(), split.valid[:, 0])
        assert torch.equal(split.test, data.test)
    # The same split every time (a run scored later gets back its points), and not simply the last rows.
    first, again = hold_out(data, 10), hold_out(data, 10)
    assert torch.equal(first.valid, again.valid)
    assert set(first.valid[:, 0].tolist()) != set(range(40, 50))


@pytest.mark.parametrize(
    "size,message", [(0, "hold out 1 to 49"), (50, "hold out 1 to 49"), (1.0, "(0, 1)"), (True, "number")]
)
def test_hold_out_refuses_sizes_it_cannot_hold_out(size, message):
    with pytest.raises(PyroVAEError) as error:
        hold_out(_toy(50), size)
    assert message in str(error.value)


def test_hold_out_refuses_a_data_set_with_its_own_valid_split():
    with pytest.raises(PyroVAEError, match="has its own valid split of 4 points"):
        hold_out(_toy(50, valid=True), 5)


def test_data_config_keeps_the_validation_size():
    assert DataConfig.from_dict(DataConfig(validation=0.1).to_dict()).validation == 0.1
    assert "validation" not in DataConfig().to_dict()  # a run without one writes its entry as before
    for bad in (0, -3, 1.5, True, "10"):
        with pytest.raises(PyroVAEError, match=r"DataConfig\.validation"):
            DataConfig(validation=bad)


# ---------------------------------------------------------------------------
# The validation score and the best checkpoint


def test_validation_epochs_are_every_n_and_the_last():
    config = TrainConfig(epochs=7, eval_every=3)
    assert [e for e in range(1, 8) if is_validation_epoch(config, e)] == [3, 6, 7]
    assert not any(is_validation_epoch(TrainConfig(epochs=7), e) for e in range(1, 8))


def test_fit_scores_the_validation_data_and_keeps_the_best_weights(digits, tmp_path):
    train, valid = digits[:150], digits[150:]
    config = TrainConfig(epochs=5, batch_size=50, eval_every=2, valid_samples=5, device="cpu")
    vae = small_vae()
    result = fit(
        vae, train, valid=valid, config=config, checkpoint=tmp_path / "checkpoint.pt", progress=False
    )
    scores = {r.epoch: r.valid_elbo for r in result.history}
    assert [e for e, s in scores.items() if s is not None] == [2, 4, 5]
    best_epoch = max((e for e in scores if scores[e] is not None), key=lambda e: scores[e])
    # best.pt holds weights that score exactly the best recorded number under that epoch's stream.
    best = small_vae()
    best.load_state_dict(load_weights(tmp_path / "best.pt"))
    with seeded(derive_seed(0, Stream.VALIDATION, best_epoch), device=torch.device("cpu")):
        again = validation_score(best, valid, num_samples=5)
    assert again == pytest.approx(scores[best_epoch], abs=1e-9)
    # The IWAE_5 bound is at least the ELBO (on average over the data, up to Monte-Carlo noise).
    assert validation_score(best, valid, num_samples=50) >= validation_score(best, valid, num_samples=1) - 0.5


def test_validation_does_not_change_what_is_trained(digits):
    train, valid = digits[:150], digits[150:]
    config = TrainConfig(epochs=3, batch_size=50, device="cpu")
    plain, scored = small_vae(), small_vae()
    fit(plain, train, config=config, progress=False)
    fit(scored, train, valid=valid, config=dataclasses.replace(config, eval_every=1), progress=False)
    for name, value in weights(plain).items():
        assert torch.equal(value, weights(scored)[name]), name


def test_eval_every_without_validation_data_is_refused(digits):
    with pytest.raises(PyroVAEError, match="eval_every scores a validation split, and none was given"):
        fit(small_vae(), digits, config=TrainConfig(epochs=1, eval_every=1, device="cpu"), progress=False)


def test_the_command_line_holds_out_scores_and_evaluates_the_best(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--epochs", "3", "--validation", "0.1", "--eval-every", "1", "--out", str(out), *SMALL]
    assert main([*argv, "--lr-schedule", "cosine"]) == 0
    assert (out / "best.pt").is_file()
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [bool(row["valid_elbo"]) for row in rows] == [True, True, True]
    capsys.readouterr()
    assert main(["evaluate", str(out), "--weights", "best", "--split", "valid", "--num-samples", "20"]) == 0
    printed = capsys.readouterr().out
    best = max(rows, key=lambda row: float(row["valid_elbo"]))
    assert f"epoch {best['epoch']}, validation score" in printed
    assert "144 data points" in printed  # 10% of digits' 1,438 training points, held out again on load


def test_evaluate_refuses_best_weights_a_run_does_not_have(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), *SMALL]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--weights", "best"]) == 2
    error = capsys.readouterr().err
    assert "has no best.pt" in error and error.count("\n") == 1


def test_the_command_line_refuses_eval_every_without_a_validation_split(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--eval-every", "1", "--out", str(out), *SMALL]) == 2
    assert "--validation N" in capsys.readouterr().err and not out.exists()  # a refusal writes nothing


def test_a_checkpoint_from_before_the_schedule_options_resumes(digits, tmp_path):
    # A checkpoint written before lr_schedule, eval_every ... existed was trained with their defaults.
    config = TrainConfig(epochs=2, batch_size=100, device="cpu")
    fit(
        small_vae(),
        digits,
        config=dataclasses.replace(config, epochs=1),
        checkpoint=tmp_path / "c.pt",
        progress=False,
    )
    saved = load_checkpoint(tmp_path / "c.pt")
    for name in ("lr_schedule", "lr_step_epochs", "lr_gamma", "lr_min", "eval_every", "valid_samples"):
        del saved["train_config"][name]
    del saved["format"]
    save_checkpoint(tmp_path / "c.pt", saved)
    result = fit(
        small_vae(), digits, config=config, checkpoint=tmp_path / "c.pt", resume=True, progress=False
    )
    assert [r.epoch for r in result.history] == [1, 2]
    # A setting that differs from the default it was trained with is still refused.
    with pytest.raises(PyroVAEError, match="differs in: lr_schedule"):
        fit(
            small_vae(),
            digits,
            config=dataclasses.replace(config, epochs=3, lr_schedule="burda"),
            checkpoint=tmp_path / "c.pt",
            resume=True,
            progress=False,
        )

"""pyro-vae train --tensorboard DIR: the event file holds the per-epoch scalars and the final image grids."""

from __future__ import annotations

import csv
import importlib.util
import sys

import pytest
import torch

from pyro_vae.cli import main

SMALL = ["--hidden-dims", "16", "--latent-dims", "2", "--batch-size", "256", "--epochs", "3"]

requires_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason="tensorboard is not installed (pip install 'pyro_vae[tensorboard]')",
)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A digits run trained with --tensorboard, and the events read back with TensorBoard's own reader."""
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed (pip install 'pyro_vae[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tmp_path_factory.mktemp("tb")
    argv = [
        "train",
        *SMALL,
        "--eval-samples",
        "0",
        "--out",
        str(root / "run"),
        "--tensorboard",
        str(root / "tb"),
    ]
    assert main(argv) == 0
    events = EventAccumulator(str(root / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return root, events


@requires_tensorboard
def test_the_event_file_holds_every_epochs_scalars(logged):
    root, events = logged
    assert list((root / "tb").glob("events.out.tfevents.*")), "no event file was written"
    tags = set(events.Tags()["scalars"])
    assert {"elbo/train", "elbo/test", "time/epoch_seconds", "kl/z"} <= tags
    with open(root / "run" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))  # metrics.csv stays, and TensorBoard holds the same numbers
    for tag, column in (
        ("elbo/train", "train_elbo"),
        ("elbo/test", "test_elbo"),
        ("time/epoch_seconds", "seconds"),
    ):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [1, 2, 3]
        # TensorBoard keeps float32; metrics.csv the seconds to 6 decimals.
        assert [s.value for s in scalars] == pytest.approx(
            [float(r[column]) for r in rows], rel=1e-5, abs=1e-6
        )
    # The KL of the only layer is a KL: positive nats per datum.
    assert all(s.value > 0 for s in events.Scalars("kl/z"))


@requires_tensorboard
def test_the_event_file_holds_the_final_image_grids(logged):
    _, events = logged
    assert {"images/reconstructions", "images/samples"} <= set(events.Tags()["images"])
    (reconstructions,) = events.Images("images/reconstructions")
    (samples,) = events.Images("images/samples")
    assert reconstructions.step == samples.step == 3
    # 32 test images of 8x8 with their 32 reconstructions: two pairs of rows of 16 (make_grid pads by 2).
    assert (reconstructions.height, reconstructions.width) == (4 * 10 + 2, 16 * 10 + 2)


@requires_tensorboard
def test_tensorboard_leaves_the_training_as_it_is(tmp_path):
    """What the hook computes (the KL, the pictures) draws from a fork of the generators: same weights."""
    from pyro_vae.training.state import load_weights

    base = ["train", *SMALL, "--eval-samples", "0"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--out", str(tmp_path / "logged"), "--tensorboard", str(tmp_path / "tb")]) == 0
    plain, logged_weights = (load_weights(tmp_path / name / "model.pt") for name in ("plain", "logged"))
    assert plain.keys() == logged_weights.keys()
    assert all(torch.equal(plain[k], logged_weights[k]) for k in plain)


def test_a_missing_tensorboard_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    # None in sys.modules makes the import fail as it does where tensorboard is not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out), "--tensorboard", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'pyro_vae[tensorboard]'" in err, err
    assert not out.exists() and not (tmp_path / "tb").exists()

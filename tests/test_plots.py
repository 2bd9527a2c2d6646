"""Figures: every function writes a readable, non-blank PNG for one-layer and hierarchical runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from pyro_vae import load_run
from pyro_vae.cli import main
from pyro_vae.models.spec import ModelSpec
from pyro_vae.plots import (
    PLOT_FILES,
    plot_interpolation,
    plot_khat,
    plot_latent_space,
    plot_manifold,
    plot_prior_samples,
    plot_reconstructions,
    plot_run,
    plot_traversals,
    save_sample_grid,
)

TINY = ["--epochs", "2", "--hidden-dims", "32", "--eval-samples", "50", "--batch-size", "256"]
KHAT = {"khat_samples": 30, "khat_limit": 40}


def read_png(path: Path) -> np.ndarray:
    """The pixels of ``path``, after checking it is a real picture with something drawn on it."""
    assert path.is_file() and path.stat().st_size > 0
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] >= 100 and pixels.shape[1] >= 100, pixels.shape
    assert pixels[..., :3].std() > 0, f"{path.name} is blank"
    return pixels


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot_runs")
    for name, latent in (("flat", "2"), ("hierarchical", "4,2")):
        assert main(["train", *TINY, "--latent-dims", latent, "--out", str(root / name)]) == 0
    return {name: load_run(root / name) for name in ("flat", "hierarchical")}


@pytest.fixture(scope="module")
def figures(runs, tmp_path_factory):
    """plot_run of each run: the paths it returned and the notes it logged."""
    out = {}
    for name, run in runs.items():
        notes: list[str] = []
        paths = plot_run(run, tmp_path_factory.mktemp(f"figures_{name}"), log=notes.append, **KHAT)
        out[name] = (paths, notes)
    return out


@pytest.mark.parametrize("name", ["flat", "hierarchical"])
def test_plot_run_writes_every_figure(figures, name):
    paths, notes = figures[name]
    # Every figure but the mixture models' components.png, which a model without a component skips.
    assert [p.name for p in paths] == [f for key, f in PLOT_FILES.items() if key != "components"]
    assert len(notes) == 1 and notes[0].startswith("skipped components.png: the model has no component_probs")
    for path in paths:
        read_png(path)


def test_no_pyplot_figure_is_left_open(figures):
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []


def test_reconstructions_wrap_into_row_pairs(runs, tmp_path):
    one_row = read_png(plot_reconstructions(runs["flat"], tmp_path / "r16.png", num=16))
    two_rows = read_png(plot_reconstructions(runs["flat"], tmp_path / "r20.png", num=20))
    assert two_rows.shape[0] > one_row.shape[0]


def test_sample_grid_is_seeded(runs, tmp_path):
    run = runs["hierarchical"]
    shape = run.model_config.image_shape
    a = read_png(save_sample_grid(run.vae, tmp_path / "a.png", num=16, image_shape=shape, seed=1))
    b = read_png(save_sample_grid(run.vae, tmp_path / "b.png", num=16, image_shape=shape, seed=1))
    c = read_png(save_sample_grid(run.vae, tmp_path / "c.png", num=16, image_shape=shape, seed=2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    read_png(save_sample_grid(run.vae, tmp_path / "t.png", image_shape=shape, title="my title\nsecond line"))


def test_traversal_and_interpolation_options(runs, tmp_path):
    run = runs["hierarchical"]
    read_png(plot_traversals(run, tmp_path / "t.png", dims=[3, 0], steps=5, span=2.0, index=-1))
    read_png(plot_interpolation(run, tmp_path / "i.png", index_a=3, index_b=7, steps=4))
    with pytest.raises(ValueError, match="dims must be"):
        plot_traversals(run, tmp_path / "bad.png", dims=[4])
    with pytest.raises(ValueError, match="out of range"):
        plot_interpolation(run, tmp_path / "bad.png", index_b=10_000)
    assert not (tmp_path / "bad.png").exists()


def test_manifold_needs_a_2d_latent(runs, tmp_path):
    run = runs["flat"]
    config = dataclasses.replace(run.model_config, latent_dims=(3,))
    spec = ModelSpec.builtin(config)
    wide = dataclasses.replace(run, model_spec=spec, vae=spec.build())
    with pytest.raises(ValueError, match="2-D latent"):
        plot_manifold(wide, tmp_path / "m.png")
    notes: list[str] = []
    paths = plot_run(wide, tmp_path / "all", log=notes.append, khat_samples=0)
    assert {p.name for p in paths} == set(PLOT_FILES.values()) - {
        "manifold.png",
        "khat.png",
        "components.png",
    }
    assert any("manifold.png" in note for note in notes) and any("khat.png" in note for note in notes)
    # A 3-D latent is drawn by PCA in the latent-space figure.
    read_png(plot_latent_space(wide, tmp_path / "pca.png", max_points=50))


def test_data_that_are_not_images(runs, tmp_path):
    run = runs["flat"]
    no_images = ModelSpec.builtin(dataclasses.replace(run.model_config, image_shape=None))
    flat = dataclasses.replace(run, model_spec=no_images)
    for draw in (
        plot_reconstructions,
        plot_prior_samples,
        plot_manifold,
        plot_traversals,
        plot_interpolation,
    ):
        with pytest.raises(ValueError, match="not images"):
            draw(flat, tmp_path / "x.png")
    with pytest.raises(ValueError, match="not images"):
        save_sample_grid(flat.vae, tmp_path / "x.png", image_shape=None)
    notes: list[str] = []
    paths = plot_run(flat, tmp_path / "all", log=notes.append, **KHAT)
    assert [p.name for p in paths] == ["elbo.png", "latent_space.png", "khat.png"]
    assert len(notes) == 2 and "not images" in notes[0] and notes[1].startswith("skipped components.png")


def test_khat_rejects_too_few_samples(runs, tmp_path):
    with pytest.raises(ValueError, match="at least 20"):
        plot_khat(runs["flat"], tmp_path / "k.png", num_samples=10)


def test_khat_picture_shows_the_runs_own_evaluation(runs, tmp_path, monkeypatch):
    """Without a K of its own, khat.png draws the k̂ that train stored: nothing is evaluated again."""
    import pyro_vae.plots as plots
    from pyro_vae.io.run import read_evaluation

    run = runs["flat"]
    stored = read_evaluation(run.path)["per_datum"]
    assert len(stored["khat"]) == len(stored["index"]) == 359  # TINY evaluates every digits test point

    def evaluate_bounds(*args, **kwargs):
        raise AssertionError("the picture evaluated the model again instead of reading evaluation.json")

    monkeypatch.setattr(plots, "evaluate_bounds", evaluate_bounds)
    read_png(plot_khat(run, tmp_path / "k.png"))
    # Given a K, the picture computes its own (and must then call the evaluator).
    with pytest.raises(AssertionError, match="evaluated the model again"):
        plot_khat(run, tmp_path / "own.png", num_samples=30)


def test_khat_picture_computes_its_own_without_an_evaluation(runs, tmp_path):
    run = runs["flat"]
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.json", "model.pt", "metrics.csv"):
        (copy / name).write_bytes((Path(run.path) / name).read_bytes())
    read_png(plot_khat(load_run(copy), tmp_path / "k.png", limit=40))


def test_a_damaged_evaluation_is_refused_not_drawn(runs, tmp_path):
    import json

    run = runs["flat"]
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.json", "model.pt", "metrics.csv", "evaluation.json"):
        (copy / name).write_bytes((Path(run.path) / name).read_bytes())
    summary = json.loads((copy / "evaluation.json").read_text())
    summary["per_datum"]["khat"] = summary["per_datum"]["khat"][:-1]
    (copy / "evaluation.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="damaged"):
        plot_khat(load_run(copy), tmp_path / "k.png")
    assert not (tmp_path / "k.png").exists()

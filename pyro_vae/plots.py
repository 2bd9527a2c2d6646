r"""Figures of a trained run: learning curves, reconstructions, samples, the latent space, PSIS k̂.

Every function draws one figure of a :class:`~pyro_vae.run.Run` into one PNG
and returns its path; :func:`plot_run` draws all that apply into a folder.
Figures are :class:`matplotlib.figure.Figure` objects saved through the Agg
canvas, never pyplot, so nothing is shown, no global figure is left open and
no backend is switched for the caller.

Every figure asks the model only what the model contract and
:mod:`pyro_vae.models.abilities` give (the latent sites, posterior means,
decoding, prior draws), so it draws any model, the package's or a user's;
one that needs what a model cannot give raises
:class:`~pyro_vae.models.abilities.AbilityMissing`, and :func:`plot_run`
skips it with one line saying why. What is drawn:

- images are means of p(x | latents), never draws, so they show what the
  decoder believes rather than Bernoulli noise;
- the latent space and traversals use the layer next to x (the first of
  ``latent_sites``: z of a one-layer VAE, z1 of a hierarchy) at its posterior
  mean E_q[z1 | x], the other layers held at theirs; interpolations move
  every layer along the line between two posterior means;
- the manifold is a grid over the top layer (the prior's), the layers below
  at the means of their conditional priors;
- prior samples are ancestral draws from the model's prior.

Image rows [N, D] are reshaped with ``run.image_shape`` ((H, W) or
(C, H, W)); values inside [0, 1] are drawn on that fixed scale, others on the
figure's own range. For data that are not images the image figures raise
ValueError, and :func:`plot_run` skips them with a note.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from pyro.distributions.torch_distribution import ExpandedDistribution
from torch import nn
from torchvision.utils import make_grid

from ._typing import VAEModel
from .errors import PyroVAEError
from .files import replace_atomic
from .inference.importance import evaluate_bounds
from .io.run import Run, read_evaluation
from .models import abilities
from .models.abilities import AbilityMissing
from .resources import check_fits

__all__ = [
    "PLOT_FILES",
    "plot_components",
    "plot_elbo_curves",
    "plot_interpolation",
    "plot_khat",
    "plot_latent_space",
    "plot_manifold",
    "plot_prior_samples",
    "plot_reconstructions",
    "plot_run",
    "plot_traversals",
    "save_sample_grid",
]

PathLike = str | os.PathLike[str]

# The file each figure of plot_run is written to, in the order they are drawn.
PLOT_FILES = {
    "elbo": "elbo.png",
    "reconstructions": "reconstructions.png",
    "samples": "samples.png",
    "latent_space": "latent_space.png",
    "manifold": "manifold.png",
    "traversals": "traversals.png",
    "interpolation": "interpolation.png",
    "khat": "khat.png",
    "components": "components.png",
}
_IMAGE_FIGURES = ("reconstructions", "samples", "manifold", "traversals", "interpolation")

_DPI = 130
_ROW_LENGTH = 16  # reconstructions: data/reconstruction row pairs of at most this many images
_MAX_TRAVERSED_DIMS = 10  # traversals of a wider latent show its most active dimensions only
_MIN_KHAT_SAMPLES = 20  # below this PSIS fits no tail (evaluation.py leaves k̂ NaN)
_DEFAULT_KHAT_SAMPLES = 500  # K of a k̂ picture of a run without an evaluation of its own


# ---------------------------------------------------------------------------
# Model and data access


def _device(vae: VAEModel) -> torch.device:
    parameter = next(iter(vae.parameters()), None) if isinstance(vae, nn.Module) else None
    return torch.device("cpu") if parameter is None else parameter.device


@contextmanager
def _seeded(vae: VAEModel, seed: int) -> Iterator[None]:
    # A fork of the global generators, so drawing a figure does not move the caller's random stream.
    device = _device(vae)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        yield


def _image_shape(run: Run) -> tuple[int, ...]:
    shape = run.image_shape
    if shape is None:
        raise PyroVAEError(
            f"the data of {run.path} ({run.data_config.dataset}) are not images (the run has no image_shape), "
            "so there is nothing to draw as a picture; plot_elbo_curves, plot_latent_space and plot_khat "
            "work for any data"
        )
    return tuple(shape)


def _split(run: Run, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The split as the model sees it (binarized like in training, as ``Run.data``) and its labels."""
    return run.data(split), run.labels(split)


def _like(run: Run) -> torch.Tensor:
    """A few data rows on the model's device: what a derived ability traces the model on."""
    return run.data("test")[:2].to(_device(run.vae))


def _checked_index(index: int, n: int, name: str) -> int:
    if not -n <= index < n:
        raise PyroVAEError(f"{name}={index} is out of range for a split of {n} data points")
    return index % n


def _sites(run: Run) -> tuple[str, ...]:
    """The latent sites, the layer next to x first."""
    return abilities.latent_sites(run.vae, _like(run))


def _posterior_means(run: Run, x: torch.Tensor, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """E_q[z | x] {site: [N, d]} on the CPU; ``x`` [N, D] is moved to the model's device."""
    with _seeded(run.vae, seed):
        means = abilities.posterior_means(run.vae, x.to(_device(run.vae)))
    return {name: value.cpu() for name, value in means.items()}


def _decode(run: Run, latents: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The mean of p(x | latents) [N, D] on the CPU."""
    device = _device(run.vae)
    with torch.no_grad():
        moved = {name: value.to(device) for name, value in latents.items()}
        return abilities.decode(run.vae, moved, like=_like(run)).cpu()


def _given(sites: Sequence[str]) -> str:
    """``z`` or ``z1, z2``: what p(x | ...) is conditioned on, for titles."""
    return ", ".join(sites)


# ---------------------------------------------------------------------------
# Drawing


def _as_images(x: torch.Tensor, image_shape: Sequence[int]) -> torch.Tensor:
    """Rows [N, D] as images [N, C, H, W]."""
    shape = tuple(image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise PyroVAEError(f"image_shape must be (H, W) or (C, H, W) with 1 or 3 channels, got {image_shape}")
    if x.shape[-1] != math.prod(shape):
        raise PyroVAEError(f"rows of {x.shape[-1]} values cannot be shown as images of shape {image_shape}")
    return x.detach().float().cpu().reshape(-1, *shape)


def _normalized(images: torch.Tensor) -> torch.Tensor:
    # Data in [0, 1] (every built-in data set) keep that fixed scale, so grey levels mean the same in
    # every figure; a few overshooting values of a likelihood mean (Gaussian) are clipped, which is why
    # the test looks at the 1st and 99th percentiles rather than the extremes.
    # NaN marks a blank tile, drawn white like the padding.
    values = images[~images.isnan()]
    lo, hi = np.percentile(values.numpy(), [1, 99]).tolist()
    if lo >= -0.05 and hi <= 1.05:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = float(values.min()), float(values.max())
    return ((images - lo) / max(hi - lo, 1e-12)).clamp(0, 1).nan_to_num(1.0)


def _draw_grid(
    ax: Axes,
    images: torch.Tensor,
    *,
    nrow: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
) -> None:
    """Images [N, C, H, W] as one picture of rows of ``nrow``, with optional labels on the rows and columns."""
    height, width = images.shape[-2:]
    pad = max(1, min(height, width) // 14)
    grid = make_grid(_normalized(images), nrow=nrow, padding=pad, pad_value=1.0)  # [3, H', W']
    picture = grid[0].numpy() if images.shape[1] == 1 else grid.permute(1, 2, 0).numpy()
    ax.imshow(picture, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    centre = lambda i, size: pad + i * (size + pad) + (size - 1) / 2  # noqa: E731
    ax.set_xticks([centre(i, width) for i in range(len(col_labels or []))], list(col_labels or []))
    ax.set_yticks([centre(i, height) for i in range(len(row_labels or []))], list(row_labels or []))
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _grid_figure(rows: int, cols: int, *, extra_width: float = 0.6, extra_height: float = 1.1) -> Figure:
    # Tiles of about half an inch, at most 12 inches wide in all.
    tile = min(0.55, 12.0 / cols)
    return Figure(
        figsize=(cols * tile + extra_width, rows * tile + extra_height), dpi=_DPI, layout="constrained"
    )


def _save(fig: Figure, path: PathLike) -> Path:
    """Write ``fig`` to ``path`` atomically and return the path written: ``.png`` added when it has no suffix."""
    path = Path(path)
    if not path.suffix:
        path = path.with_name(
            path.name + ".png"
        )  # what matplotlib would write: say so, rather than the name given
    kind = path.suffix[1:].lower()
    formats = fig.canvas.get_supported_filetypes()
    if kind not in formats:
        raise PyroVAEError(
            f"cannot draw {path}: matplotlib writes {', '.join('.' + f for f in sorted(formats))}, not .{kind}"
        )
    # A tight box: image grids keep their aspect, so the figure is cropped to them rather than guessed.
    replace_atomic(
        path, lambda tmp: fig.savefig(tmp, format=kind, dpi=_DPI, bbox_inches="tight", pad_inches=0.1)
    )
    fig.clear()
    return path


def _set_title(ax: Axes, *lines: str, fontsize: float = 10) -> None:
    """A title of ``lines``, each wrapped to the figure's width so that none is clipped."""
    chars = max(40, int(ax.figure.get_figwidth() * 120 / fontsize))
    ax.set_title("\n".join(textwrap.fill(line, chars) for line in lines), fontsize=fontsize)


def _draws(sites: Sequence[str]) -> str:
    """How the latents are drawn from the prior, for titles (``sites`` the layer next to x first)."""
    if len(sites) == 1:
        return f" {sites[0]} ~ p({sites[0]})"
    return f" from the prior, ancestrally ({', then '.join(reversed(sites))})"


def _run_name(run: Run) -> str:
    name, dataset = Path(run.path).name, run.data_config.dataset
    return name if name == dataset else f"{name} ({dataset})"


# ---------------------------------------------------------------------------
# Figures


def plot_elbo_curves(run: Run, path: PathLike) -> Path:
    """Train and test ELBO per datum against the epoch, and the final importance-sampled test log p̂(x).

    The log p̂(x) point (with its standard error and K) is read from the
    run's ``evaluation.json`` when training wrote one. With 20 epochs or more
    the y axis covers the last 90% of epochs (the first ones, far below, would
    flatten the rest), and the title says so.
    """
    if not run.history:
        raise PyroVAEError(f"{run.path} has no training history (metrics.csv is empty); train the run first")
    epochs = [r.epoch for r in run.history]
    fig = Figure(figsize=(7.5, 4.5), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    marker = "o" if len(epochs) <= 30 else None  # a few epochs are points, not a line
    ax.plot(epochs, [r.train_elbo for r in run.history], label="train ELBO", color="C0", marker=marker)
    tested = [(r.epoch, r.test_elbo) for r in run.history if r.test_elbo is not None]
    if tested:
        ax.plot(*zip(*tested, strict=True), label="test ELBO", color="C1", marker=marker)
    evaluation = Path(run.path) / "evaluation.json"
    log_px = None
    if evaluation.is_file():
        summary = json.loads(evaluation.read_text())
        log_px = float(summary["log_px"])
        ax.errorbar(
            [epochs[-1]],
            [log_px],
            yerr=[summary.get("log_px_stderr") or 0.0],
            fmt="*",
            markersize=13,
            color="C3",
            label=f"final test log p̂(x) = {log_px:.2f} (importance sampling, K={summary['num_samples']})",
        )
    subtitle = _run_name(run)
    if len(epochs) >= 20:
        first = epochs[len(epochs) // 10]
        shown = [r.train_elbo for r in run.history if r.epoch >= first]
        shown += [e for epoch, e in tested if epoch >= first] + ([] if log_px is None else [log_px])
        low, high = min(shown), max(shown)
        ax.set_ylim(low - 0.1 * (high - low), high + 0.15 * (high - low))
        subtitle += f"; y axis fitted to epochs {first}+, earlier ones run off the bottom"
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per data point")
    _set_title(ax, "ELBO per data point during training", subtitle, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def plot_reconstructions(run: Run, path: PathLike, *, num: int = 16, split: str = "test") -> Path:
    """The first ``num`` data points of ``split`` above their reconstructions, the mean of p(x | z) at E_q[z | x]."""
    image_shape = _image_shape(run)
    if num < 1:
        raise PyroVAEError(f"num must be a positive integer, got {num}")
    x = _split(run, split)[0][:num]
    sites = _sites(run)
    recon = _decode(run, _posterior_means(run, x))
    per_row = min(len(x), _ROW_LENGTH)
    data_rows, recon_rows = x.split(per_row), recon.split(per_row)
    tiles, labels = [], []
    for data_row, recon_row in zip(data_rows, recon_rows, strict=True):
        pad = per_row - len(data_row)  # a short last row is filled with blank (NaN) tiles
        tiles += [
            data_row,
            data_row.new_full((pad, x.shape[1]), math.nan),
            recon_row,
            recon_row.new_full((pad, x.shape[1]), math.nan),
        ]
        labels += ["data", "reconstruction"]
    fig = _grid_figure(len(labels), per_row, extra_width=1.6)
    ax = fig.add_subplot()
    _draw_grid(ax, _as_images(torch.cat(tiles), image_shape), nrow=per_row, row_labels=labels)
    binarized = "" if run.binarize == "none" else f" ({run.binarize}ally binarized)"
    at = ", ".join(f"{z} = E_q[{z} | x]" for z in sites)
    _set_title(
        ax,
        f"{len(x)} {split} images{binarized} and their reconstructions",
        f"the mean of p(x | {_given(sites)}) at {at}; {_run_name(run)}",
    )
    return _save(fig, path)


def save_sample_grid(
    vae: VAEModel,
    path: PathLike,
    *,
    num: int = 64,
    image_shape: Sequence[int] | None,
    seed: int = 0,
    title: str | None = None,
    like: torch.Tensor | None = None,
    draws: bool = False,
) -> Path:
    """A square grid of ``num`` means of p(x | z) for ancestral draws z ~ p(z), or (``draws``) x ~ p(x | z).

    The means are what VAE papers usually show; the draws are what the model
    really generates (for a Bernoulli likelihood, binary images with their noise).

    The draws come from a fork of torch's generators seeded with ``seed``: the
    same seed gives the same grid, and the caller's random stream is untouched.
    ``like`` (a few data rows) is needed only by a model whose prior draws and
    decoding are derived by tracing it (:mod:`pyro_vae.models.abilities`).
    """
    if image_shape is None:
        raise PyroVAEError(
            "the data of this model are not images (no image_shape), so samples cannot be drawn"
        )
    if num < 1:
        raise PyroVAEError(f"num must be a positive integer, got {num}")
    device = _device(vae)
    # At least the decoded images [num, D] in float32, and the grid's pixels as many again.
    need = 4 * num * 2 * math.prod(image_shape)
    check_fits(need, device=device, what=f"drawing {num} samples", advice="lower --num")
    like = None if like is None else like.to(device)
    with _seeded(vae, seed):
        samples = abilities.prior_samples(vae, num, like=like, mean=not draws).cpu()
    images = _as_images(samples, image_shape)
    nrow = math.ceil(math.sqrt(num))
    fig = _grid_figure(math.ceil(num / nrow), nrow, extra_width=0.3, extra_height=0.9)
    ax = fig.add_subplot()
    _draw_grid(ax, images, nrow=nrow)
    if title is None:
        sites = abilities.latent_sites(vae, like) if like is not None else ("z",)
        kind = "Draws x ~ p(x | " if draws else "Means of p(x | "
        title = f"{kind}{_given(sites)}) for {num} draws{_draws(sites)}"
    _set_title(ax, *title.split("\n"))
    return _save(fig, path)


def plot_prior_samples(run: Run, path: PathLike, *, num: int = 64, seed: int = 0) -> Path:
    """Means of p(x | z) for ``num`` draws z ~ p(z) from the run's prior, in a grid (see :func:`save_sample_grid`)."""
    sites = _sites(run)
    prior = f"prior {run.model_spec.config.prior}, " if run.model_spec.config is not None else ""
    title = (
        f"Means of p(x | {_given(sites)}) for {num} draws{_draws(sites)}\n"
        f"{prior}seed {seed}; {_run_name(run)}"
    )
    return save_sample_grid(
        run.vae, path, num=num, image_shape=_image_shape(run), seed=seed, title=title, like=_like(run)
    )


def _class_colours(ax: Axes, coords: np.ndarray, labels: np.ndarray) -> None:
    """A scatter coloured by class: a legend of the classes for up to 20, a colour bar beyond."""
    classes = np.unique(labels)
    if len(classes) > 20:
        points = ax.scatter(coords[:, 0], coords[:, 1], c=labels, cmap="viridis", s=8, alpha=0.7)
        ax.figure.colorbar(points, ax=ax, label="label")
        return
    palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    handles = []
    for i, c in enumerate(classes):
        chosen = labels == c
        ax.scatter(coords[chosen, 0], coords[chosen, 1], color=palette(i), s=8, alpha=0.7)
        handles.append(Line2D([], [], marker="o", linestyle="", color=palette(i), label=str(int(c))))
    ax.legend(handles=handles, title="label", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def plot_latent_space(run: Run, path: PathLike, *, split: str = "test", max_points: int = 2000) -> Path:
    """Posterior means E_q[z1 | x] of the first ``max_points`` data points of ``split``, coloured by label.

    A 2-D latent is drawn as it is; a wider one by its first two principal
    components (SVD of the centred means), with the share of variance each
    explains in the axis labels; a 1-D one against the label (or at random
    heights when there are no labels). Works for data that are not images.
    """
    if max_points < 1:
        raise PyroVAEError(f"max_points must be a positive integer, got {max_points}")
    x, labels = _split(run, split)
    x = x[:max_points]
    labels_np = None if labels is None else labels[:max_points].numpy()
    z = _sites(run)[0]
    means = _posterior_means(run, x)[z].double()  # [N, d]
    n, d = means.shape
    fig = Figure(figsize=(7.5, 6.0), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    if d == 1:
        generator = torch.Generator().manual_seed(0)
        jitter = 0.3 * (torch.rand(n, generator=generator, dtype=torch.float64) - 0.5)
        height = jitter if labels is None else labels[:max_points].double() + jitter
        coords = torch.stack([means[:, 0], height], dim=1).numpy()
        xlabel, ylabel = f"E[{z} | x]", "label (jittered)" if labels is not None else "random height"
        what = f"Posterior means E[{z} | x] of {n} {split} points (1-D latent)"
    elif d == 2:
        coords = means.numpy()
        xlabel, ylabel = f"E[{z}[0] | x]", f"E[{z}[1] | x]"
        what = f"Posterior means E[{z} | x] of {n} {split} points"
    else:
        centred = means - means.mean(0)
        u, s, _ = torch.linalg.svd(centred, full_matrices=False)
        share = s.pow(2) / s.pow(2).sum()
        coords = (u[:, :2] * s[:2]).numpy()
        xlabel = f"PC1 ({100 * float(share[0]):.1f}% of variance)"
        ylabel = f"PC2 ({100 * float(share[1]):.1f}% of variance)"
        what = f"PCA of the {d}-dim posterior means E[{z} | x] of {n} {split} points"
    if labels_np is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=8, alpha=0.7, color="C0")
    else:
        _class_colours(ax, coords, labels_np)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _set_title(ax, what, _run_name(run) + ("" if labels_np is not None else ", no labels"), fontsize=11)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_manifold(run: Run, path: PathLike, *, steps: int = 15) -> Path:
    """Means of p(x | z) over a ``steps`` x ``steps`` grid of standard-normal quantiles of a 2-D latent.

    The grid is z = (Φ⁻¹(p_i), Φ⁻¹(p_j)) for p evenly spaced in [0.05, 0.95]:
    equal prior mass between neighbours when p(z) = N(0, I). Other priors get
    the same N(0, 1) grid (the title says so). The latent is the top layer
    (the last of ``latent_sites``: z of a one-layer VAE, zL of a hierarchical
    one); the layers below are set to the means of their conditional priors.
    """
    image_shape = _image_shape(run)
    if steps < 2:
        raise PyroVAEError(f"steps must be at least 2, got {steps}")
    sites = _sites(run)
    name = sites[-1]
    like = _like(run)
    prior = abilities.prior_distribution(run.vae, name, like=like)
    top = math.prod(prior.event_shape)
    if top != 2:
        raise AbilityMissing(
            f"the manifold is drawn only for a 2-D latent, and this run's top latent {name} has {top} "
            "dimensions; use plot_latent_space or plot_traversals for it"
        )
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, steps))  # [steps]
    # Row i from the top holds the i-th largest second coordinate, so "up" in the picture is up in z.
    second, first = torch.meshgrid(q.flip(0), q, indexing="ij")
    z = torch.stack([first.reshape(-1), second.reshape(-1)], dim=1)  # [steps², 2]
    images = _as_images(_decode(run, {name: z}), image_shape)
    fig = _grid_figure(steps, steps, extra_width=1.2, extra_height=1.5)
    ax = fig.add_subplot()
    ticks = [f"{v:.2f}" for v in q.tolist()]
    _draw_grid(ax, images, nrow=steps, row_labels=ticks[::-1], col_labels=ticks)
    ax.tick_params(axis="both", labelsize=7)
    ax.set_xlabel(f"{name}[0]")
    ax.set_ylabel(f"{name}[1]")
    below = ", ".join(sites[:-1])
    lower = sites[:-1]
    which = (
        "the mean of its conditional prior" if len(lower) == 1 else "the means of their conditional priors"
    )
    via = f", {below} at {which}" if below else ""
    caveat = (
        []
        if _is_standard_normal(prior)
        else [f"The prior of {name} is not N(0, 1): the grid uses N(0, 1) quantiles anyway."]
    )
    _set_title(
        ax,
        f"Means of p(x | {name}) over a {steps}x{steps} grid of N(0, 1) quantiles 5%..95%{via}",
        _run_name(run),
        *caveat,
    )
    return _save(fig, path)


def _is_standard_normal(prior: Any) -> bool:
    """Whether ``prior`` is N(0, I): a Normal (possibly made independent) with loc 0 and scale 1."""
    while isinstance(prior, torch.distributions.Independent | ExpandedDistribution):
        prior = prior.base_dist
    return (
        isinstance(prior, torch.distributions.Normal)
        and bool((prior.loc == 0).all())
        and bool((prior.scale == 1).all())
    )


def plot_traversals(
    run: Run,
    path: PathLike,
    *,
    dims: Sequence[int] | None = None,
    steps: int = 9,
    span: float = 3.0,
    index: int = 0,
) -> Path:
    """One row per latent dimension j: E_q[z1 | x] of test image ``index`` with ``span`` * [-1 .. 1] added to coordinate j.

    Uses z1, the layer next to x (the first of ``latent_sites``), with every
    other layer held at its posterior mean for image ``index``. ``dims``
    (0-based) defaults to every dimension of a latent of at most 10, and
    otherwise to the 10 whose posterior means vary most across (up to 1000)
    test images, the active units.
    """
    image_shape = _image_shape(run)
    if steps < 2:
        raise PyroVAEError(f"steps must be at least 2, got {steps}")
    if not span > 0:
        raise PyroVAEError(f"span must be positive, got {span}")
    x = _split(run, "test")[0]
    index = _checked_index(index, len(x), "index")
    sites = _sites(run)
    name = sites[0]
    means = _posterior_means(run, x[:1000])[name]  # [n, d]
    d = means.shape[1]
    if dims is None:
        chosen = range(d) if d <= _MAX_TRAVERSED_DIMS else means.var(0).topk(_MAX_TRAVERSED_DIMS).indices
        dims = sorted(int(j) for j in chosen)
        selection = "" if d <= _MAX_TRAVERSED_DIMS else f", the {len(dims)} of {d} whose E[z|x] vary most"
    else:
        dims = [int(j) for j in dims]
        bad = [j for j in dims if not 0 <= j < d]
        if bad or not dims:
            raise PyroVAEError(f"dims must be a non-empty list of indices in 0..{d - 1}, got {dims}")
        selection = ""
    base = _posterior_means(run, x[index : index + 1])  # {site: [1, d_site]}
    offsets = torch.linspace(-span, span, steps)
    z = base[name][0].repeat(len(dims), steps, 1)  # [rows, steps, d]
    for row, j in enumerate(dims):
        z[row, :, j] += offsets
    tiles = len(dims) * steps
    latents = {site: value.expand(tiles, -1) for site, value in base.items()}
    latents[name] = z.reshape(-1, d)
    images = _as_images(_decode(run, latents), image_shape)
    fig = _grid_figure(len(dims), steps, extra_width=1.0, extra_height=1.6)
    ax = fig.add_subplot()
    _draw_grid(
        ax,
        images,
        nrow=steps,
        row_labels=[f"{name}[{j}]" for j in dims],
        col_labels=[f"{v:+.2f}" for v in offsets.tolist()],
    )
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel(f"offset added to that coordinate of E[{name} | x]")
    ax.set_ylabel("latent dimension varied")
    held = "".join(f", {site} at E[{site} | x]" for site in sites[1:])
    _set_title(
        ax,
        f"Latent traversals around E[{name} | x] of test image #{index}{selection}",
        f"decoded as the mean of p(x | {_given(sites)}){held}; {_run_name(run)}",
    )
    return _save(fig, path)


def plot_interpolation(
    run: Run, path: PathLike, *, index_a: int = 0, index_b: int = 1, steps: int = 10
) -> Path:
    """The means of p(x | z) along the straight line from E_q[z | x_a] to E_q[z | x_b], between x_a and x_b.

    Every latent layer moves along its own line, z_t = (1 - t) E_q[z | x_a] + t E_q[z | x_b].
    """
    image_shape = _image_shape(run)
    if steps < 2:
        raise PyroVAEError(f"steps must be at least 2, got {steps}")
    x = _split(run, "test")[0]
    a, b = _checked_index(index_a, len(x), "index_a"), _checked_index(index_b, len(x), "index_b")
    sites = _sites(run)
    ends = _posterior_means(run, x[[a, b]])  # {site: [2, d_site]}
    t = torch.linspace(0.0, 1.0, steps)[:, None]  # [steps, 1]
    decoded = _decode(run, {site: (1 - t) * end[0] + t * end[1] for site, end in ends.items()})
    images = _as_images(torch.cat([x[a : a + 1], decoded, x[b : b + 1]]), image_shape)
    fig = _grid_figure(1, steps + 2, extra_width=0.6, extra_height=1.7)
    ax = fig.add_subplot()
    labels = [f"data\n#{a}", *[f"{v:.2f}" for v in t[:, 0].tolist()], f"data\n#{b}"]
    _draw_grid(ax, images, nrow=steps + 2, col_labels=labels)
    ax.tick_params(axis="x", labelsize=8)
    name = sites[0] if len(sites) == 1 else f"({_given(sites)})"
    ax.set_xlabel(f"t in {name} = (1 - t) E[{name} | x_a] + t E[{name} | x_b]")
    _set_title(
        ax,
        f"Interpolation between test images #{a} and #{b} in latent space",
        f"decoded as the mean of p(x | {_given(sites)}); {_run_name(run)}",
    )
    return _save(fig, path)


def plot_khat(
    run: Run, path: PathLike, *, num_samples: int | None = None, limit: int = 500, seed: int = 0
) -> Path:
    """PSIS k̂ of the importance weights p(x, z) / q(z | x) of each test point, as the run's evaluation found it.

    With ``num_samples`` None the k̂ are those of the run's own evaluation (``evaluation.json``, written by
    ``pyro-vae train``: its K and its points), so the picture and the printed k̂ line agree. A run without
    one, or a ``num_samples`` given, gets k̂ computed here with that K (default 500) on the first ``limit``
    test points; the title says which, with K and the number of points.

    k̂ < 0.5: log p̂(x) converges quickly; 0.5-0.7: slowly; > 0.7: the
    weights' tail is too heavy for K samples to give a trustworthy estimate
    (Vehtari et al., 2024). Drawn as ArviZ draws k̂ (``arviz.plot_khat``); infinite k̂ are
    counted above 0.7 but not drawn. Works for data that are not images.
    """
    if num_samples is not None and num_samples < _MIN_KHAT_SAMPLES:
        raise PyroVAEError(
            f"num_samples must be at least {_MIN_KHAT_SAMPLES} for PSIS to fit a tail, got {num_samples}"
        )
    if limit < 1:
        raise PyroVAEError(f"limit must be a positive integer, got {limit}")
    stored = _stored_khat(run) if num_samples is None else None
    x_test = _split(run, "test")[0]
    if stored is not None:
        index, khat, k = stored
        source = "the run's evaluation (evaluation.json)"
        which = (
            f"all {len(khat)} test points"
            if len(khat) == len(x_test)
            else f"{len(khat)} of the {len(x_test)} test points, drawn at random"
        )
    else:
        k = _DEFAULT_KHAT_SAMPLES if num_samples is None else num_samples
        x = x_test[:limit].to(_device(run.vae))
        device = _device(run.vae)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            bounds = evaluate_bounds(run.vae.model, run.vae.guide, x, num_samples=k, progress=False)
        khat = bounds.khat.numpy()
        index = np.arange(len(khat))
        source = "computed for this picture"  # the run has no evaluation of its own, or K was given
        which = f"the first {len(khat)} of {len(x_test)} test points"
    known = khat[~np.isnan(khat)]
    above = float((known > 0.7).mean()) if len(known) else float("nan")
    finite = np.isfinite(khat)
    fig = Figure(figsize=(8.0, 4.5), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    # ArviZ's k̂ scatter, drawn here: ArviZ 1.x's plot_khat takes only the ELPDData of its loo, on its own figure.
    drawn = khat[finite]
    colours = np.where(drawn > 0.7, "C3", np.where(drawn > 0.5, "C1", "C0"))
    ax.scatter(index[finite], drawn, c=colours, marker="+", s=20, linewidths=1)
    ax.axhline(0.5, color="C1", linestyle="--", linewidth=1, label="k̂ = 0.5: slower convergence above")
    ax.axhline(0.7, color="C3", linestyle="--", linewidth=1, label="k̂ = 0.7: unreliable above")
    ax.set_xlabel("test data point (index in the test split)")
    ax.set_ylabel("Pareto k̂ of the importance weights")
    infinite = int((~finite & ~np.isnan(khat)).sum())
    not_drawn = f", {infinite} infinite not drawn" if infinite else ""
    maximum = f"max {np.nanmax(khat):.2f}" if len(known) else "none estimated"
    _set_title(
        ax,
        f"PSIS k̂ of the importance weights p(x, z) / q(z | x), K = {k} per point",
        f"{source}: {which}; {100 * above:.1f}% above 0.7 ({maximum}{not_drawn})",
        _run_name(run),
        fontsize=11,
    )
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    return _save(fig, path)


def _stored_khat(run: Run) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(test indices, k̂, K) of the run's evaluation.json, or None when it holds no per-point k̂ to draw.

    None also for an evaluation with too few samples for any k̂ (all NaN): the picture then computes its own.
    """
    summary = read_evaluation(run.path)
    per_datum = (summary or {}).get("per_datum") or {}
    khat, index = per_datum.get("khat"), per_datum.get("index")
    if summary is None or khat is None or index is None or summary.get("split", "test") != "test":
        return None
    # JSON's null for a k̂ that could not be estimated: NaN, as the evaluator leaves it.
    values = np.array([math.nan if v is None else v for v in khat], dtype=np.float64)
    points = np.asarray(index, dtype=np.int64)
    if len(values) != len(points) or len(values) != summary.get("num_data"):
        raise PyroVAEError(
            f"{Path(run.path) / 'evaluation.json'} has {len(values)} k̂ for {len(points)} test indices and "
            f"num_data {summary.get('num_data')}: it is damaged; delete it or train again"
        )
    if np.isnan(values).all():  # K below 21 fits no tail: nothing stored to draw, so k̂ is computed here
        return None
    return points, values, int(summary["num_samples"])


def plot_run(
    run: Run,
    out_dir: PathLike,
    *,
    split: str = "test",
    seed: int = 0,
    khat_samples: int | None = None,
    khat_limit: int = 500,
    log: Callable[[str], object] | None = print,
) -> list[Path]:
    """Every figure that applies to ``run``, written into ``out_dir`` under the names of :data:`PLOT_FILES`.

    Skipped, with one line to ``log`` each (``None`` for silence): the image
    figures for data that are not images; k̂ when ``khat_samples`` is 0 (None: the k̂ of the run's own
    evaluation, see :func:`plot_khat`); and
    any figure that needs what the model cannot give (an
    :class:`~pyro_vae.models.abilities.AbilityMissing`, e.g. the manifold
    unless the top latent is 2-D). ``split`` is the split of the
    reconstructions and the latent space; traversals, interpolation and k̂
    use the test split. ``components.png`` (:func:`plot_components`) needs a model with a discrete
    component site (``component_probs``, a mixture VAE); the others skip it with a line. Returns the paths written, in :data:`PLOT_FILES` order.
    """
    if khat_samples is not None and khat_samples != 0 and khat_samples < _MIN_KHAT_SAMPLES:
        raise PyroVAEError(
            f"khat_samples must be 0 (skip) or at least {_MIN_KHAT_SAMPLES}, got {khat_samples}"
        )
    out = Path(out_dir)
    note = log or (lambda _: None)
    skipped: set[str] = set()
    if run.image_shape is None:
        skipped.update(_IMAGE_FIGURES)
        note(f"skipped {', '.join(PLOT_FILES[f] for f in _IMAGE_FIGURES)}: the data are not images")
    if khat_samples == 0:
        skipped.add("khat")
        note("skipped khat.png: khat_samples is 0")
    draw: dict[str, Callable[[Path], Path]] = {
        "elbo": lambda p: plot_elbo_curves(run, p),
        "reconstructions": lambda p: plot_reconstructions(run, p, split=split),
        "samples": lambda p: plot_prior_samples(run, p, seed=seed),
        "latent_space": lambda p: plot_latent_space(run, p, split=split),
        "manifold": lambda p: plot_manifold(run, p),
        "traversals": lambda p: plot_traversals(run, p),
        "interpolation": lambda p: plot_interpolation(run, p),
        "khat": lambda p: plot_khat(run, p, num_samples=khat_samples, limit=khat_limit, seed=seed),
        "components": lambda p: plot_components(run, p, split=split, seed=seed),
    }
    written = []
    for name, file in PLOT_FILES.items():
        if name in skipped:
            continue
        try:
            written.append(draw[name](out / file))
        except AbilityMissing as missing:
            note(f"skipped {file}: {missing}")
    return written


def plot_components(
    run: Run,
    path: PathLike,
    *,
    split: str = "test",
    max_points: int = 2000,
    per_component: int = 8,
    seed: int = 0,
) -> Path:
    """Posterior means E_q[z | x] of ``split``, coloured by each point's most probable component argmax_c q(c | x).

    For a model with a discrete component site (the ``component_probs(x)`` ability of
    :class:`~pyro_vae.models.mixture.MixtureVAE`); raises
    :class:`~pyro_vae.models.abilities.AbilityMissing` for one without. Projected as
    :func:`plot_latent_space` projects (the first two principal components beyond two dimensions).
    For image data and a model with ``sample_component(c, num)``, a second panel shows the means of
    p(x | z) for ``per_component`` draws z ~ p(z | c), one row per component (seeded by ``seed``).
    """
    if max_points < 1:
        raise PyroVAEError(f"max_points must be a positive integer, got {max_points}")
    component_probs = getattr(run.vae, "component_probs", None)
    if not callable(component_probs):
        raise AbilityMissing(
            "the model has no component_probs(x) ability: no discrete component to colour by"
        )
    x = _split(run, split)[0][:max_points]
    z = _sites(run)[0]
    means = _posterior_means(run, x)[z].double()  # [N, d]
    with torch.no_grad():
        probs = component_probs(x.to(_device(run.vae))).cpu()  # [N, C]
    chosen, confidence = probs.argmax(-1).numpy(), probs.max(-1).values.numpy()
    n, d = means.shape
    if d >= 2:
        centred = means - means.mean(0)
        u, s, _ = torch.linalg.svd(centred, full_matrices=False)
        coords = means.numpy() if d == 2 else (u[:, :2] * s[:2]).numpy()
        share = s.pow(2) / s.pow(2).sum()
        xlabel, ylabel = (
            (f"E[{z}[0] | x]", f"E[{z}[1] | x]")
            if d == 2
            else (f"PC1 ({100 * float(share[0]):.1f}%)", f"PC2 ({100 * float(share[1]):.1f}%)")
        )
    else:
        coords = np.stack([means[:, 0].numpy(), chosen + 0.3 * (np.random.default_rng(0).random(n) - 0.5)], 1)
        xlabel, ylabel = f"E[{z} | x]", "component (jittered)"
    num = probs.shape[1]
    sample_component = getattr(run.vae, "sample_component", None)
    grid = run.image_shape is not None and callable(sample_component) and per_component > 0
    fig = Figure(figsize=(13.0 if grid else 7.5, max(6.0, 0.5 * num + 1.0)), dpi=_DPI, layout="constrained")
    panels = fig.add_gridspec(1, 2, width_ratios=(1.4, 1.0)) if grid else fig.add_gridspec(1, 1)
    ax = fig.add_subplot(panels[0])
    if grid:
        with _seeded(run.vae, seed):
            draws = torch.cat([sample_component(c, per_component) for c in range(num)])  # type: ignore[misc]
        images = _as_images(_decode(run, {z: draws}), _image_shape(run))  # [C * per_component, ...]
        grid_ax = fig.add_subplot(panels[1])
        _draw_grid(grid_ax, images, nrow=per_component, row_labels=[str(c) for c in range(num)])
        grid_ax.set_ylabel("component c")
        _set_title(
            grid_ax, f"Means of p(x | z) for z ~ p(z | c), {per_component} per component", f"seed {seed}"
        )
    palette = colormaps["tab10" if num <= 10 else "tab20"]
    handles = []
    for c in range(num):
        mine = chosen == c
        # Opacity follows q(c | x): a point the guide is unsure of is drawn faint. A component that no
        # point prefers has no points (matplotlib refuses an empty array of opacities), only its legend entry.
        if mine.any():
            ax.scatter(
                coords[mine, 0],
                coords[mine, 1],
                color=palette(c % palette.N),
                s=8,
                alpha=0.2 + 0.6 * confidence[mine],
            )
        handles.append(
            Line2D(
                [],
                [],
                marker="o",
                linestyle="",
                color=palette(c % palette.N),
                label=f"{c} ({int(mine.sum())})",
            )
        )
    ax.legend(
        handles=handles, title="argmax q(c | x)", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _set_title(
        ax, f"Posterior means E[{z} | x] of {n} {split} points by component", _run_name(run), fontsize=11
    )
    ax.grid(alpha=0.3)
    return _save(fig, path)

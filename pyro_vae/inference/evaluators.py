"""The evaluators side by side, behind one registry: ``is``, ``ais``, ``bdmc``, ``gaps``.

Each entry takes a model of the contract, data ``x`` and :class:`EvaluationOptions`, and
returns an :class:`Evaluation`: the JSON-able summary (always ``method`` and ``num_data``,
then the method's own keys) and the lines of its report. ``pyro-vae evaluate --method``,
``pyro-vae list`` and the tests read this registry.

What each number bounds, and what it costs (N data points, D latent dimensions):

- ``is``: log p̂(x) = log (1/K) sum_k w_k with the guide as proposal; a stochastic lower
  bound, tight when q is close to the posterior, with PSIS k̂ saying when it is not.
  N K passes of the model and guide.
- ``ais``: annealed importance sampling from the guide (or prior) to the posterior; a
  stochastic lower bound that reaches log p(x) as the steps grow, whatever the guide.
  N C T (L + 1) passes with gradients (C chains, T steps, L leapfrog steps), plus the pilot.
- ``bdmc``: forward and reverse AIS on data simulated from the model; the gap between the
  stochastic lower and upper bounds bounds the error of AIS (and of anything worse) there.
  About three times ``ais`` on the simulated points.
- ``gaps``: log p̂(x) (AIS or IS), the encoder's ELBO and the ELBO of a per-datum optimized
  guide: the approximation gap (the family) and the amortization gap (the encoder).
  ``ais`` plus N S (steps) passes with gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch

from .._typing import VAEModel
from ..registry import Registry
from .ais import AnnealingSettings, ais
from .bdmc import bdmc
from .gaps import GapSettings, gaps
from .importance import evaluate_bounds, latent_layers_within
from .traces import MAX_MEMORY

__all__ = ["EVALUATORS", "Evaluation", "EvaluationOptions", "importance_report", "run_evaluator"]


@dataclass(frozen=True)
class EvaluationOptions:
    """Everything an evaluator may read; each reads the fields of its method."""

    seed: int = 0
    num_samples: int = 1000  # is: K importance samples per datum
    chunk_size: int = 1000  # is: samples per vectorized pass (at most)
    max_memory: int | None = MAX_MEMORY  # bytes an evaluation pass may add (plan_passes); None: none
    annealing: AnnealingSettings = field(default_factory=AnnealingSettings)  # ais, bdmc, gaps (log p̂(x))
    gaps: GapSettings = field(default_factory=GapSettings)
    num_simulated: int | None = None  # bdmc: data points simulated from the model (default: as many as x)
    data_chunk_size: int | None = None  # ais, bdmc, gaps: data points per vectorized pass
    progress: bool | None = None  # None: a bar when stderr is a terminal


@dataclass(frozen=True)
class Evaluation:
    """What an evaluator found: the JSON summary and the lines of its report."""

    summary: dict[str, Any]
    report: list[str]


EVALUATORS: Registry = Registry("evaluator")


def _conditional_note(conditional_on: Any) -> list[str]:
    if not conditional_on:
        return []
    sites = ", ".join(conditional_on)
    return [
        f"conditional on the global latent(s) {sites} at the guide's mean (its median where it has none): "
        f"each figure is log p(x_i | {sites}), not the marginal log p(x_i)"
    ]


def importance_report(summary: dict[str, Any]) -> list[str]:
    """The lines of the importance-sampling report: nats per datum and bits per dimension."""
    data_dim = summary.get("data_dim")

    def bits(nats: float) -> str:
        return f"{-nats / (data_dim * math.log(2)):10.4f}" if data_dim else ""

    lines = [f"{'':18}{'nats/datum':>14}{'bits/dim':>11}"]
    lines.append(f"{'ELBO':18}{summary['elbo']:14.3f}{bits(summary['elbo'])}")
    for k, value in summary["iwae"].items():
        lines.append(f"{'IWAE-' + k:18}{value:14.3f}{bits(value)}")
    stderr = summary["log_px_stderr"]
    lines.append(
        f"{'log p(x) (IS)':18}{summary['log_px']:14.3f}{bits(summary['log_px'])}   ± {stderr:.3f} (MC stderr)"
    )
    lines.append(f"{'NLL':18}{summary['nll']:14.3f}{bits(summary['log_px'])}")
    lines += _conditional_note(summary.get("conditional_on"))
    for layer in summary.get("layers", []):
        carrying = layer.get("units_with_kl")
        lines.append(
            f"latent {layer['site']} (dim {layer['dim']}): KL {layer['kl']:.3f} nats, "
            f"{layer['active_units']} of {layer['dim']} units active (Var_x E[z|x] > 0.01)"
            + ("" if carrying is None else f", {carrying} carry KL > 0.01 nats")
        )
    if summary.get("khat_max") is not None:
        frac = summary["khat_frac_above_0_7"]
        lines.append(f"PSIS k-hat: max {summary['khat_max']:.2f}, {100 * frac:.1f}% of data points above 0.7")
        if frac > 0:
            lines.append(
                f"warning: k-hat > 0.7 for {round(frac * summary['num_data'])} of {summary['num_data']} data points: "
                "their log p(x) estimates are unreliable (the guide's tails are too light); raise --num-samples, "
                "improve the guide, or use --method ais"
            )
    return lines


@EVALUATORS.register("is")
def importance_sampling(vae: VAEModel, x: torch.Tensor, *, options: EvaluationOptions) -> Evaluation:
    """Importance sampling with the guide as proposal: ELBO, IWAE-k, log p(x), PSIS k-hat (cheapest)."""
    pyro.set_rng_seed(options.seed)
    bounds = evaluate_bounds(
        vae.model,
        vae.guide,
        x,
        num_samples=options.num_samples,
        chunk_size=options.chunk_size,
        max_memory=options.max_memory,
    )
    layers = latent_layers_within(
        vae.model, vae.guide, x, num_samples=min(options.num_samples, 100), max_memory=options.max_memory
    )
    summary = {"method": "is", **bounds.summary(data_dim=x.shape[-1])}
    summary["data_dim"] = x.shape[-1]
    summary["layers"] = layers
    return Evaluation(summary, importance_report(summary))


@EVALUATORS.register("ais")
def annealed_importance_sampling(vae: VAEModel, x: torch.Tensor, *, options: EvaluationOptions) -> Evaluation:
    """Annealed importance sampling with HMC from the guide to the posterior: log p(x) that any guide reaches."""
    pyro.set_rng_seed(options.seed)
    settings = options.annealing
    result = ais(
        vae.model,
        vae.guide,
        x,
        settings=settings,
        data_chunk_size=options.data_chunk_size,
        progress=options.progress,
        max_memory=options.max_memory,
    )
    summary = {"method": "ais", **result.summary()}
    report = [
        f"{'log p(x) (AIS)':18}{summary['log_px']:14.3f}   ± {summary['log_px_stderr']:.3f} (MC stderr over chains)",
        f"{'NLL':18}{summary['nll']:14.3f}",
        f"{settings.num_chains} chains from the {settings.start}, {settings.num_steps} {settings.schedule} steps, "
        f"HMC with {settings.leapfrog_steps} leapfrog steps: acceptance {summary['accept_rate']:.2f} "
        f"(target {settings.target_accept}), effective chains {float(result.ess.mean()):.1f} of "
        f"{settings.num_chains} on average",
    ]
    return Evaluation(summary, report + _conditional_note(result.conditional_on))


@EVALUATORS.register("bdmc")
def bidirectional_monte_carlo(vae: VAEModel, x: torch.Tensor, *, options: EvaluationOptions) -> Evaluation:
    """Bidirectional Monte Carlo on simulated data: forward and reverse AIS sandwich log p(x)."""
    pyro.set_rng_seed(options.seed)
    settings = options.annealing
    result = bdmc(
        vae.model,
        vae.guide,
        x,
        num_data=options.num_simulated,
        settings=settings,
        data_chunk_size=options.data_chunk_size,
        progress=options.progress,
        max_memory=options.max_memory,
    )
    summary = {"method": "bdmc", **result.summary()}
    report = [
        f"on {summary['num_data']} data points simulated from the model:",
        f"{'lower (forward)':18}{summary['lower']:14.3f}",
        f"{'upper (reverse)':18}{summary['upper']:14.3f}",
        f"{'gap':18}{summary['gap']:14.3f}   (in expectation, AIS with these settings is within this of log p(x))",
    ]
    return Evaluation(summary, report + _conditional_note(result.conditional_on))


@EVALUATORS.register("gaps")
def inference_gaps(vae: VAEModel, x: torch.Tensor, *, options: EvaluationOptions) -> Evaluation:
    """The inference gaps: log p(x) - ELBO split into approximation and amortization gaps (Cremer et al.)."""
    pyro.set_rng_seed(options.seed)
    result = gaps(
        vae.model,
        vae.guide,
        x,
        settings=options.gaps,
        annealing=options.annealing,
        data_chunk_size=options.data_chunk_size,
        progress=options.progress,
        max_memory=options.max_memory,
    )
    summary = {"method": "gaps", **result.summary()}
    report = [
        f"{'log p(x) (' + result.log_px_method.upper() + ')':22}{summary['log_px']:12.3f}",
        f"{'ELBO (encoder)':22}{summary['elbo']:12.3f}",
        f"{'ELBO (optimized)':22}{summary['elbo_optimized']:12.3f}   "
        f"({options.gaps.optimize_steps} Adam steps per datum from the encoder's output)",
        f"{'approximation gap':22}{summary['approximation_gap']:12.3f}   (log p(x) - optimized ELBO: the family)",
        f"{'amortization gap':22}{summary['amortization_gap']:12.3f}   (optimized - encoder ELBO: the encoder)",
    ]
    return Evaluation(summary, report + _conditional_note(result.conditional_on))


def run_evaluator(method: str, vae: VAEModel, x: torch.Tensor, *, options: EvaluationOptions) -> Evaluation:
    """The evaluator registered as ``method`` run on ``x`` (an unknown name is refused with the valid ones)."""
    evaluate = EVALUATORS.get(method)
    evaluation: Evaluation = evaluate(vae, x, options=options)
    return evaluation

"""Evaluators: per-datum log-weights from traces, importance-sampled bounds on log p(x), PSIS, per-layer KL,
annealed importance sampling, bidirectional Monte Carlo and the inference gaps, behind one registry
(:data:`EVALUATORS`: ``is``, ``ais``, ``bdmc``, ``gaps``).

Every evaluator validates the model and guide first (:func:`validate_pair`) and
evaluates a model with global latents at the guide's plug-in value of them
(:func:`per_datum_pair`).
"""

from .ais import AISResult, AnnealingSettings, ais, annealing_schedule
from .bdmc import BDMCResult, bdmc
from .bounds import Bounds, default_iwae_ks
from .conditioning import PerDatumPair, per_datum_pair, plug_in_value
from .evaluators import EVALUATORS, Evaluation, EvaluationOptions, run_evaluator
from .gaps import GapSettings, GapsResult, gaps
from .importance import check_sampling_args, evaluate_bounds, log_marginal, plan_importance_passes
from .layers import latent_layers
from .psis import psis_khat
from .traces import log_weights, traced_log_weights
from .validation import PairStructure, validate_pair

__all__ = [
    "EVALUATORS",
    "AISResult",
    "AnnealingSettings",
    "BDMCResult",
    "Bounds",
    "Evaluation",
    "EvaluationOptions",
    "GapSettings",
    "GapsResult",
    "PairStructure",
    "PerDatumPair",
    "ais",
    "annealing_schedule",
    "bdmc",
    "check_sampling_args",
    "default_iwae_ks",
    "evaluate_bounds",
    "gaps",
    "latent_layers",
    "log_marginal",
    "log_weights",
    "per_datum_pair",
    "plan_importance_passes",
    "plug_in_value",
    "psis_khat",
    "run_evaluator",
    "traced_log_weights",
    "validate_pair",
]

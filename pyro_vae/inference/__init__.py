"""Evaluators: per-datum log-weights from traces, importance-sampled bounds on log p(x), PSIS, per-layer KL.

Every evaluator validates the model and guide first (:func:`validate_pair`) and
evaluates a model with global latents at the guide's plug-in value of them
(:func:`per_datum_pair`).
"""

from .bounds import Bounds, default_iwae_ks
from .conditioning import PerDatumPair, per_datum_pair, plug_in_value
from .importance import check_sampling_args, evaluate_bounds, log_marginal
from .layers import latent_layers
from .psis import psis_khat
from .traces import log_weights, traced_log_weights
from .validation import PairStructure, validate_pair

__all__ = [
    "Bounds",
    "PairStructure",
    "PerDatumPair",
    "check_sampling_args",
    "default_iwae_ks",
    "evaluate_bounds",
    "latent_layers",
    "log_marginal",
    "log_weights",
    "per_datum_pair",
    "plug_in_value",
    "psis_khat",
    "traced_log_weights",
    "validate_pair",
]

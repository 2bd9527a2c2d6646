r"""Pareto-smoothed importance sampling diagnostics: the k̂ of each datum's importance weights.

Above 0.7 the weights have too heavy a tail for an importance-sampling
estimate to converge at a usable rate (Vehtari, Simpson, Gelman, Yao & Gabry,
"Pareto Smoothed Importance Sampling", JMLR 25(72), 2024).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["MIN_SAMPLES_FOR_KHAT", "psis_khat"]

# PSIS needs a tail to fit: below this many samples k̂ is not estimated.
MIN_SAMPLES_FOR_KHAT = 20


def psis_khat(log_w: torch.Tensor) -> torch.Tensor:
    """Pareto k̂ of each column of ``log_w`` [K, n] with ArviZ's PSIS.

    Columns whose weights are equal up to rounding (an exact posterior as the
    guide) have no tail to fit, and PSIS would return inf for them; their
    importance sampling is perfect, so their k̂ is 0.
    """
    from arviz import psislw

    spread = log_w.max(0).values - log_w.min(0).values
    flat = spread <= 1e-8 * log_w.abs().max(0).values.clamp_min(1.0)
    khat = torch.zeros(log_w.shape[1], dtype=torch.float64)
    if not flat.all():
        with warnings.catch_warnings():
            # ArviZ warns once per call when some k̂ > 0.7; the report says so per datum instead.
            warnings.simplefilter("ignore")
            _, fitted = psislw(log_w[:, ~flat].T.cpu().numpy())
        khat[~flat.cpu()] = torch.as_tensor(np.asarray(fitted, dtype=np.float64)).reshape(-1)
    return khat

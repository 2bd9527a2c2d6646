r"""Pareto-smoothed importance sampling diagnostics: the k̂ of each datum's importance weights.

For one datum's K importance weights w_k = p(x, z_k) / q(z_k | x), PSIS fits a
generalized Pareto distribution (GPD) to the M = ceil(min(K / 5, 3 sqrt(K)))
largest weights, in excess of the largest weight below them (the cutoff u)::

    w_(K-M+j) - u ~ GPD(k, sigma),   j = 1..M

The shape k is estimated as Zhang & Stephens (2009) do, with the profile
likelihood of theta = -k / sigma averaged over a grid of m = 30 + floor(sqrt(M))
candidates, and shrunk toward 0.5 with the weight of 10 pseudo-observations
(Vehtari et al., 2024, appendix)::

    k(theta) = mean_j log(1 - theta y_j),     y_j = w_(K-M+j) - u (ascending)
    l(theta) = M (log(-theta / k(theta)) - k(theta) - 1)
    theta_m  = 1 / y_M + (1 - sqrt(m / (i - 1/2))) / (3 y_(floor(M/4 + 1/2))),   i = 1..m
    theta^   = sum_i softmax(l)_i theta_i
    k^       = (M k(theta^) + 10 * 0.5) / (M + 10)

Above k̂ = 0.7 the weights have too heavy a tail for an importance-sampling
estimate to converge at a usable rate; 0.5-0.7 converges, slowly.

This is the arithmetic of ArviZ 0.2x's ``psislw`` and of R's ``loo``, step for
step, so k̂ do not move from the numbers runs reported before. It lives here,
not in ArviZ, because arviz-stats 1.x takes M = floor(3 sqrt(K)) tail draws
instead of the ceiling (94 instead of 95 at K = 1000), which moves k̂ by up to
0.05 for the same weights: one formula keeps a run's k̂ the same whichever
ArviZ is installed. ``tests/test_arviz_compat.py`` checks it against the
installed ArviZ wherever the two tail lengths agree.

References:
    Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto Smoothed Importance
    Sampling", JMLR 25(72), 2024.
    Zhang & Stephens, "A New and Efficient Estimation Method for the
    Generalized Pareto Distribution", Technometrics 51(3), 2009.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["MIN_SAMPLES_FOR_KHAT", "psis_khat"]

# PSIS needs a tail to fit: below this many samples k̂ is not estimated.
MIN_SAMPLES_FOR_KHAT = 20

# A cutoff below the smallest positive float would make exp(u) = 0 and the excesses meaningless.
_LOG_TINY = math.log(np.finfo(np.float64).tiny)


def psis_khat(log_w: torch.Tensor) -> torch.Tensor:
    """Pareto k̂ of each column of ``log_w`` [K, n], float64 [n].

    Columns whose weights are equal up to rounding (an exact posterior as the
    guide) have no tail to fit, and PSIS would return inf for them; their
    importance sampling is perfect, so their k̂ is 0.
    """
    spread = log_w.max(0).values - log_w.min(0).values
    flat = spread <= 1e-8 * log_w.abs().max(0).values.clamp_min(1.0)
    khat = torch.zeros(log_w.shape[1], dtype=torch.float64)
    columns = log_w[:, ~flat].double().cpu().numpy().T  # [n_fitted, K]
    fitted = [_pareto_khat(column) for column in columns]
    khat[~flat.cpu()] = torch.tensor(fitted, dtype=torch.float64)
    return khat


def _pareto_khat(log_w: np.ndarray) -> float:
    """k̂ of the GPD fitted to the right tail of one datum's weights, from their logs ``log_w`` [K].

    inf when the tail has 4 values or fewer (K <= 20, or ties at the cutoff):
    too few to fit, so nothing vouches for the estimate.
    """
    num_samples = len(log_w)
    tail_length = int(np.ceil(min(num_samples / 5.0, 3 * num_samples**0.5)))
    x = log_w - np.max(log_w)  # the largest weight is 1: no overflow in exp
    cutoff = max(np.sort(x)[-tail_length - 1], _LOG_TINY)
    tail = np.sort(x[x > cutoff])  # ties with the cutoff stay in the body
    if len(tail) <= 4:
        return math.inf
    return _gpd_shape(np.exp(tail) - np.exp(cutoff))


def _gpd_shape(y: np.ndarray) -> float:
    """Zhang & Stephens' estimate of the GPD shape of the ascending excesses ``y`` [M], with the 0.5 prior."""
    prior_strength, prior_k, grid_scale = 10, 0.5, 3
    n = len(y)
    m = 30 + int(n**0.5)
    theta = 1 - np.sqrt(m / (np.arange(1, m + 1, dtype=float) - 0.5))  # [m]
    theta /= grid_scale * y[int(n / 4 + 0.5) - 1]
    theta += 1 / y[-1]
    k = np.log1p(-theta[:, None] * y).mean(axis=1)  # [m]
    profile = n * (np.log(-(theta / k)) - k - 1)  # [m]
    # softmax(profile) as 1 / sum_j exp(l_j - l_i): no overflow for profile log-likelihoods in the thousands
    weights = 1 / np.exp(profile - profile[:, None]).sum(axis=1)
    kept = weights >= 10 * np.finfo(float).eps
    weights, theta = weights[kept], theta[kept]
    weights /= weights.sum()
    theta_hat = np.sum(theta * weights)
    k_hat = np.log1p(-theta_hat * y).mean()
    return float((n * k_hat + prior_strength * prior_k) / (n + prior_strength))

"""Per-datum bounds on log p(x) from one set of K importance samples, and their per-datum means."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import PyroVAEError

__all__ = ["Bounds", "default_iwae_ks"]


def default_iwae_ks(num_samples: int) -> list[int]:
    """1, 5, 50, 500, 5000, ... up to ``num_samples``."""
    ks, k = [1], 5
    while k <= num_samples:
        ks.append(k)
        k *= 10
    return ks


@dataclass(frozen=True)
class Bounds:
    """Per-datum estimates from one set of K importance samples; every tensor is float64 [N]."""

    elbo: torch.Tensor
    iwae: dict[int, torch.Tensor]
    log_px: torch.Tensor
    log_px_stderr: torch.Tensor
    khat: torch.Tensor | None
    ess: torch.Tensor | None
    num_samples: int
    # Global latent sites fixed at the guide's plug-in value g*: the estimates are then of log p(x_i | g*)
    # (see pyro_vae.inference.conditioning). Empty for a model whose latents are all per datum.
    conditional_on: tuple[str, ...] = ()

    @property
    def num_data(self) -> int:
        return self.log_px.shape[0]

    @classmethod
    def concatenate(cls, parts: Sequence[Bounds]) -> Bounds:
        """The bounds of consecutive slices of a data set, joined in order (all with the same K and globals)."""
        if not parts or len({(part.num_samples, part.conditional_on) for part in parts}) != 1:
            raise PyroVAEError(
                "concatenate needs one or more Bounds, all from the same number of samples and conditional "
                "on the same global sites"
            )

        def cat(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
            return None if any(t is None for t in tensors) else torch.cat(tensors)  # type: ignore[arg-type]

        return cls(
            elbo=torch.cat([part.elbo for part in parts]),
            iwae={k: torch.cat([part.iwae[k] for part in parts]) for k in parts[0].iwae},
            log_px=torch.cat([part.log_px for part in parts]),
            log_px_stderr=torch.cat([part.log_px_stderr for part in parts]),
            khat=cat([part.khat for part in parts]),
            ess=cat([part.ess for part in parts]),
            num_samples=parts[0].num_samples,
            conditional_on=parts[0].conditional_on,
        )

    def summary(self, *, data_dim: int | None = None, bits_scale: float = 1.0) -> dict[str, Any]:
        """Per-datum means in nats, as reported in papers.

        ``log_px_stderr`` is the Monte-Carlo error of the mean log p̂(x);
        ``nll = -log_px``; ``bits_per_dim = nll / (data_dim ln 2)`` when
        ``data_dim`` is given (``bits_scale`` adds a constant number of nats per
        dimension, e.g. ln 256 for data scaled from 0..255 to [0, 1]).
        ``conditional_on`` lists the global latent sites the estimates are
        conditional on (at the guide's plug-in value), ``[]`` for most models.
        """
        n = self.num_data
        log_px = float(self.log_px.mean())
        out: dict[str, Any] = {
            "elbo": float(self.elbo.mean()),
            "iwae": {str(k): float(v.mean()) for k, v in self.iwae.items()},
            "log_px": log_px,
            "log_px_stderr": float(self.log_px_stderr.pow(2).sum().sqrt() / n),
            "nll": -log_px,
            "bits_per_dim": None,
            "khat_max": None,
            "khat_frac_above_0_7": None,
            "num_samples": self.num_samples,
            "num_data": n,
            "conditional_on": list(self.conditional_on),
        }
        if data_dim is not None:
            out["bits_per_dim"] = (-log_px / data_dim + math.log(bits_scale)) / math.log(2)
        if self.khat is not None and not torch.isnan(self.khat).all():
            # NaN (too few samples to fit a tail) is left out of both; inf counts as above 0.7.
            known = self.khat[~torch.isnan(self.khat)]
            out["khat_max"] = float(known.max())
            out["khat_frac_above_0_7"] = float((known > 0.7).double().mean())
        return out

"""The beta weight of the KL term: every latent site's log-density scaled, in the model and guide alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyro.poutine.messenger import Messenger

__all__ = ["LatentWeight", "scale_latents"]


class LatentWeight(Messenger):
    """Multiplies the log-density of every latent (unobserved) sample site by ``beta``."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict) -> None:  # type: ignore[override]
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.beta


def scale_latents(fn: Callable[..., Any], weight: LatentWeight) -> Callable[..., Any]:
    """``fn`` with every latent site's log-density multiplied by ``weight.beta``.

    Applied to both model and guide, log p(z) - log q(z|x) is scaled and
    log p(x|z) is not: the ELBO becomes E_q[log p(x|z)] - beta KL(q || p). The
    weight object is shared and mutable, so a warm-up can change beta between
    steps without rebuilding anything.
    """

    def scaled(*args: Any, **kwargs: Any) -> Any:
        with weight:
            return fn(*args, **kwargs)

    return scaled

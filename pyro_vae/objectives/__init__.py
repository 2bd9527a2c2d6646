r"""Training objectives: Pyro ELBO classes chosen by name (``--loss``), and the beta weight.

``LOSSES`` maps a name to a factory ``(*, num_particles) -> pyro.infer.ELBO``.
All of them treat the model's ``"data"`` plate as the only plate
(``max_plate_nesting=1``), draw their particles in one vectorized pass, and
return the loss as a tensor on the model's device (no host synchronisation).

- ``elbo``: E_q[log p(x, z) - log q(z | x)] by Monte Carlo (Trace_ELBO).
- ``mean-field``: the same bound with KL(q(z|x) || p(z)) in closed form where
  the guide and prior have one (TraceMeanField_ELBO); other latent sites fall
  back to Monte Carlo, with a warning naming them.
- ``iwae``: the importance-weighted bound of Burda et al. (2016),
  sum_i log (1/K) sum_k w_ik, per data point.

``make_loss("elbo", free_bits=lam)`` (``--free-bits``) is the ELBO with each
latent layer's KL term replaced by max(lam, KL_l), the layer's Monte Carlo KL
averaged over the minibatch (:class:`FreeBits_ELBO`; Kingma et al., 2016).

Each checks the model and guide against each other the first time it sees
them (:func:`pyro_vae.inference.validate_pair`, with the objective's name, so
that ``iwae`` and ``mean-field`` refuse a guide site without ``rsample``, and
``iwae`` a global latent), on a copy of the random state.

``make_loss(name, jit=True)`` wraps any of them in :class:`JitELBO`, which
compiles the loss with Pyro's ``pyro.ops.jit.trace`` (TorchScript): the
model and guide run in Python once per input shape, and every later step
replays the recorded graph of tensor operations without Pyro's messenger
bookkeeping.

:func:`scale_latents` multiplies every latent site's log-density by beta, in
the model and the guide alike, so any of these objectives becomes
E_q[log p(x|z)] - beta KL(q(z|x) || p(z)) (Higgins et al., 2017).

References:
    Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
    Higgins et al., "beta-VAE: Learning Basic Visual Concepts with a Constrained
    Variational Framework", ICLR 2017.
"""

from __future__ import annotations

from .elbo import DeviceTrace_ELBO, trace_elbo
from .enum import Enum_ELBO, SumsEnumerated, enum_elbo
from .free_bits import FreeBits_ELBO, free_bits_elbo
from .iwae import IWAE_ELBO, iwae
from .jit import JitELBO
from .kl_weight import LatentWeight, scale_latents
from .mean_field import MeanField_ELBO, mean_field_elbo
from .registry import LOSSES, make_loss

__all__ = [
    "IWAE_ELBO",
    "LOSSES",
    "DeviceTrace_ELBO",
    "Enum_ELBO",
    "FreeBits_ELBO",
    "JitELBO",
    "LatentWeight",
    "MeanField_ELBO",
    "SumsEnumerated",
    "enum_elbo",
    "free_bits_elbo",
    "iwae",
    "make_loss",
    "mean_field_elbo",
    "scale_latents",
    "trace_elbo",
]

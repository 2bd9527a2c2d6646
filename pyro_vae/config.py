"""Small frozen configs, one per concern, that round-trip through JSON.

``ModelConfig`` is everything needed to rebuild a model (``build_vae``);
``TrainConfig`` is how it was fitted; ``DataConfig`` where its data came from.
A run folder's ``config.json`` holds all three.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import PyroVAEError

__all__ = [
    "BINARIZE_MODES",
    "DEVICES",
    "INFERENCE",
    "LAYER_INITS",
    "LR_SCHEDULES",
    "TOP_DOWN",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
]

BINARIZE_MODES = ("auto", "none", "static", "dynamic")
INFERENCE = ("bottom-up", "ladder")
# ModelConfig.top_down and layer_init (the hierarchical model's GaussianLayer reads the same names).
TOP_DOWN = ("plain", "residual")
LAYER_INITS = ("torch", "glorot")
DEVICES = ("auto", "cpu", "cuda")
# TrainConfig.lr_schedule (the rates themselves: training.schedules).
LR_SCHEDULES = ("constant", "burda", "step", "cosine")


def _positive_int(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PyroVAEError(f"{owner}.{name} must be a positive integer, got {value!r}")


def _from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PyroVAEError(
            f"{cls.__name__} has no field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
        )
    return cls(**data)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture: which prior, likelihood, guide and networks, and their sizes."""

    data_dim: int
    # One entry per stochastic layer; a single layer today (hierarchical latents come later).
    latent_dims: tuple[int, ...] = (20,)
    # Encoder widths, input to output; the decoder mirrors them.
    hidden_dims: tuple[int, ...] = (400,)
    prior: str = "standard-normal"
    # Keyword options of the prior's constructor, e.g. {"num_components": 10} for "mixture".
    prior_options: Mapping[str, float] = field(default_factory=dict)
    likelihood: str = "bernoulli"
    # Keyword options of the likelihood's constructor, e.g. {"scale": 0.1} for "gaussian".
    likelihood_options: Mapping[str, float] = field(default_factory=dict)
    guide: str = "diagonal"
    # Keyword options of the guide head's constructor, e.g. {"rank": 4} for "low-rank".
    guide_options: Mapping[str, float] = field(default_factory=dict)
    network: str = "mlp"
    # Activation of the networks: softplus, tanh (Burda et al.), relu or elu; None keeps the network's own
    # default (softplus for mlp, as in Pyro's VAE example; ELU for conv).
    activation: str | None = None
    # Inference for several latent layers: "bottom-up" q(z1|x) q(z2|z1)... or "ladder" (Sønderby et al., 2016).
    inference: str = "bottom-up"
    # Shape of one data point as an image, for plots; None for non-image data.
    image_shape: tuple[int, ...] | None = None
    # With several latent layers, the hidden widths between z_l and z_{l+1} (z1-z2 first), used both ways
    # (p(z_l | z_{l+1}) and q(z_{l+1} | z_l) or the ladder's upward net). None: len(hidden_dims) layers as
    # wide as z_l, the lower layer, as Burda et al. (2016, section 5): 100,50 gives z1 -> 100 -> 100 -> z2.
    layer_hidden_dims: tuple[tuple[int, ...], ...] | None = None
    # p(z_l | z_{l+1}): "residual" adds a linear path to the mean that starts as the identity, so z_{l+1}
    # moves the mean of z_l from the first step; "plain" is an MLP alone (whose top layer went unused).
    top_down: str = "residual"
    # Initialization of the layers between latent layers: "glorot" (Glorot & Bengio, 2010; Burda et al.) or
    # "torch" (torch's default, which shrinks the signal about threefold in variance per layer).
    layer_init: str = "glorot"

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so configs compare and hash by value.
        object.__setattr__(self, "latent_dims", tuple(self.latent_dims))
        object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))
        if self.layer_hidden_dims is not None:
            object.__setattr__(self, "layer_hidden_dims", tuple(tuple(w) for w in self.layer_hidden_dims))
        object.__setattr__(self, "prior_options", dict(self.prior_options))
        object.__setattr__(self, "likelihood_options", dict(self.likelihood_options))
        object.__setattr__(self, "guide_options", dict(self.guide_options))
        if self.image_shape is not None:
            object.__setattr__(self, "image_shape", tuple(self.image_shape))
        _positive_int("ModelConfig", "data_dim", self.data_dim)
        if not self.latent_dims:
            raise PyroVAEError("ModelConfig.latent_dims needs at least one latent size")
        for d in self.latent_dims:
            _positive_int("ModelConfig", "latent_dims", d)
        if not self.hidden_dims:
            raise PyroVAEError("ModelConfig.hidden_dims needs at least one hidden width, e.g. (400,)")
        for h in self.hidden_dims:
            _positive_int("ModelConfig", "hidden_dims", h)
        if self.inference not in INFERENCE:
            raise PyroVAEError(
                f"ModelConfig.inference must be one of {', '.join(INFERENCE)}, got {self.inference!r}"
            )
        if self.layer_hidden_dims is not None:
            if len(self.layer_hidden_dims) != len(self.latent_dims) - 1:
                raise PyroVAEError(
                    f"ModelConfig.layer_hidden_dims needs one list of widths per pair of latent layers "
                    f"({len(self.latent_dims) - 1} for latent_dims {self.latent_dims}), got "
                    f"{len(self.layer_hidden_dims)}"
                )
            for widths in self.layer_hidden_dims:
                if not widths:
                    raise PyroVAEError("ModelConfig.layer_hidden_dims needs at least one width per pair")
                for h in widths:
                    _positive_int("ModelConfig", "layer_hidden_dims", h)
        if self.top_down not in TOP_DOWN:
            raise PyroVAEError(
                f"ModelConfig.top_down must be one of {', '.join(TOP_DOWN)}, got {self.top_down!r}"
            )
        if self.layer_init not in LAYER_INITS:
            raise PyroVAEError(
                f"ModelConfig.layer_init must be one of {', '.join(LAYER_INITS)}, got {self.layer_init!r}"
            )
        if self.image_shape is not None and math.prod(self.image_shape) != self.data_dim:
            raise PyroVAEError(
                f"ModelConfig.image_shape {self.image_shape} holds {math.prod(self.image_shape)} values, "
                f"but data_dim is {self.data_dim}"
            )

    @property
    def latent_dim(self) -> int:
        """Size of the first (lowest) latent layer z1."""
        return self.latent_dims[0]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """The config that ``to_dict`` wrote; one saved before the fields of the layers between latent
        layers existed rebuilds the network it described: ``hidden_dims``-many layers as wide as z_{l+1},
        a plain top-down MLP and torch's initialization."""
        data = dict(data)
        if "layer_hidden_dims" not in data and len(data.get("latent_dims", ())) > 1:
            depth = len(data.get("hidden_dims", cls.__dataclass_fields__["hidden_dims"].default))
            dims = data["latent_dims"]
            data["layer_hidden_dims"] = [[dims[i + 1]] * depth for i in range(len(dims) - 1)]
        data.setdefault("top_down", "plain")
        data.setdefault("layer_init", "torch")
        return _from_dict(cls, data)


def _option(default: Any, help_text: str, *, metavar: str | None = None) -> Any:
    # A field with its one-line help (and the placeholder its value is shown as), from which the command
    # line's flags are generated.
    metadata = {"help": help_text} if metavar is None else {"help": help_text, "metavar": metavar}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """How the model is fitted: SVI with Adam on a Monte-Carlo ELBO.

    Each field's ``metadata["help"]`` is the one line the command line shows for it.
    """

    epochs: int = _option(50, "passes over the training data")
    # The global minibatch: with shards, over all shards and processes together.
    batch_size: int = _option(128, "data points per step (over all shards and processes)")
    lr: float = _option(1e-3, "Adam's learning rate")
    # Samples z ~ q(z|x) per data point per step, drawn in one vectorized pass.
    num_particles: int = _option(1, "samples of z per datum per step")
    loss: str = _option("elbo", "the training objective: elbo, mean-field or iwae")
    # Weight of the KL term, E_q[log p(x|z)] - beta KL (Higgins et al., 2017); 1 is the ELBO.
    beta: float = _option(1.0, "weight of the KL term (beta-VAE)")
    # Epochs over which the KL weight rises linearly from 0 to beta (Sønderby et al., 2016).
    warmup_epochs: int = _option(0, "epochs to ramp the KL weight 0 -> beta")
    # Free bits (Kingma et al., 2016): each latent layer's KL term is max(free_bits, KL_l), KL_l in nats per
    # datum averaged over the minibatch (objectives.FreeBits_ELBO); None: the plain ELBO.
    free_bits: float | None = _option(
        None,
        "nats per latent layer below which its KL is not penalized (free bits; with --loss elbo)",
        metavar="NATS",
    )
    # Largest norm of the gradient of all parameters together; None: no clipping.
    clip_norm: float | None = _option(None, "clip the gradient's global norm to this")
    seed: int = _option(
        0, "random seed of the data order and the noise (the command line also seeds the initial weights)"
    )
    device: str = _option("auto", "auto, cpu, cuda or cuda:N")
    # One fused torch Adam over all parameters (training.optim.JointAdam); False: pyro.optim.Adam per parameter.
    fused_adam: bool = _option(
        True, "one fused Adam over all parameters (default), or Pyro's per-parameter Adam"
    )
    # Compile the loss by tracing (objectives.JitELBO); needs a model whose structure and constants are fixed.
    jit: bool = _option(
        False, "compile the loss by tracing it once per minibatch shape (not with --warmup-epochs)"
    )
    # Cut every minibatch into this many shards, each with its own random streams (training.distributed);
    # a run of W processes has W (or a multiple). None: one process drawing from torch's global generator.
    shards: int | None = _option(
        None,
        "cut every minibatch into S shards with their own random streams and average their gradients: "
        "the result of S processes of --distributed (there the default is the number of processes)",
        metavar="S",
    )
    # The learning rate over the epochs (training.schedules): constant; burda, Burda et al.'s (2016) 8 stages
    # of 3^i epochs at lr * 10^(-i/7), i = 0..7 (3,280 epochs in all); step, lr * lr_gamma^floor((e-1) /
    # lr_step_epochs); cosine, from lr down to lr_min over the epochs (Loshchilov & Hutter, 2017).
    lr_schedule: Literal["constant", "burda", "step", "cosine"] = _option(
        "constant",
        "the learning rate over the epochs: constant; burda (stage i = 0..7 lasts 3^i epochs at lr * "
        "10^(-i/7)); step (times --lr-gamma every --lr-step-epochs); cosine (lr down to --lr-min)",
    )
    lr_step_epochs: int | None = _option(None, "with --lr-schedule step: epochs between two decays")
    lr_gamma: float = _option(0.1, "with --lr-schedule step: the factor of each decay")
    lr_min: float = _option(0.0, "with --lr-schedule cosine: the rate the cosine falls to")
    # Score the validation split every eval_every epochs (and after the last) and keep the best weights in
    # best.pt beside the checkpoint; None: no validation during training.
    eval_every: int | None = _option(
        None, "score the validation split every N epochs (and after the last), keeping the best in best.pt"
    )
    # K of the validation score: 1 is the ELBO, K > 1 the importance-weighted bound IWAE_K <= log p(x).
    valid_samples: int = _option(1, "K of the validation score: 1 the ELBO, K > 1 the IWAE_K bound")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "num_particles", "valid_samples"):
            _positive_int("TrainConfig", name, getattr(self, name))
        if not (isinstance(self.beta, int | float) and math.isfinite(self.beta) and self.beta >= 0):
            raise PyroVAEError(f"TrainConfig.beta must be a non-negative number, got {self.beta!r}")
        if (
            isinstance(self.warmup_epochs, bool)
            or not isinstance(self.warmup_epochs, int)
            or self.warmup_epochs < 0
        ):
            raise PyroVAEError(
                f"TrainConfig.warmup_epochs must be a non-negative integer, got {self.warmup_epochs!r}"
            )
        if self.clip_norm is not None and not (
            isinstance(self.clip_norm, int | float) and math.isfinite(self.clip_norm) and self.clip_norm > 0
        ):
            raise PyroVAEError(
                f"TrainConfig.clip_norm must be a positive number or None, got {self.clip_norm!r}"
            )
        if self.free_bits is not None:
            if isinstance(self.free_bits, bool) or not (
                isinstance(self.free_bits, int | float)
                and math.isfinite(self.free_bits)
                and self.free_bits >= 0
            ):
                raise PyroVAEError(
                    f"TrainConfig.free_bits must be a non-negative number of nats or None, got {self.free_bits!r}"
                )
            if self.loss != "elbo":
                raise PyroVAEError(
                    f"free bits clamp each latent layer's KL term of the ELBO; the {self.loss!r} objective has no "
                    "per-layer KL term to clamp; use --loss elbo with --free-bits, or drop --free-bits"
                )
        if self.loss == "iwae" and (self.beta != 1 or self.warmup_epochs):
            raise PyroVAEError(
                "beta and warm-up weight the KL term of the ELBO, which the iwae bound does not have; "
                "use --loss elbo or mean-field with --beta, or drop --beta/--warmup-epochs"
            )
        for name in ("fused_adam", "jit"):
            if not isinstance(getattr(self, name), bool):
                raise PyroVAEError(f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.jit and self.warmup_epochs:
            raise PyroVAEError(
                "the jit-compiled loss is traced once, so it cannot follow a KL weight that changes every "
                "step; use --no-jit with --warmup-epochs, or drop the warm-up"
            )
        if self.shards is not None:
            _positive_int("TrainConfig", "shards", self.shards)
            if self.batch_size % self.shards:
                raise PyroVAEError(
                    f"the minibatch of {self.batch_size} points cannot be cut into {self.shards} equal shards; "
                    f"use a --batch-size that is a multiple of {self.shards} (it is the global minibatch, "
                    "over all processes)"
                )
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise PyroVAEError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        # numpy's legacy generator, which the seed also sets, takes 32-bit seeds only.
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise PyroVAEError(
                f"TrainConfig.seed must be an integer from 0 to 2**32 - 1 = {2**32 - 1}, got {self.seed!r}"
            )
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise PyroVAEError(
                f"TrainConfig.device must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}"
            )
        self._check_schedule()

    def _check_schedule(self) -> None:
        """Refuse a learning-rate schedule or validation setting that is unknown or would do nothing."""
        if self.lr_schedule not in LR_SCHEDULES:
            raise PyroVAEError(
                f"TrainConfig.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if self.lr_schedule == "step":
            if self.lr_step_epochs is None:
                raise PyroVAEError(
                    "the step schedule needs --lr-step-epochs N, the epochs between two decays of the rate"
                )
            _positive_int("TrainConfig", "lr_step_epochs", self.lr_step_epochs)
        elif self.lr_step_epochs is not None:
            raise PyroVAEError(
                f"--lr-step-epochs is an option of --lr-schedule step, and the schedule is {self.lr_schedule}; "
                "drop it or pass --lr-schedule step"
            )
        if isinstance(self.lr_gamma, bool) or not (
            isinstance(self.lr_gamma, int | float) and 0 < self.lr_gamma <= 1
        ):
            raise PyroVAEError(f"TrainConfig.lr_gamma must be a number in (0, 1], got {self.lr_gamma!r}")
        if isinstance(self.lr_min, bool) or not (
            isinstance(self.lr_min, int | float) and 0 <= self.lr_min < self.lr
        ):
            raise PyroVAEError(
                f"TrainConfig.lr_min must be a number from 0 up to (not including) lr {self.lr}, got "
                f"{self.lr_min!r}"
            )
        if self.lr_schedule != "step" and self.lr_gamma != 0.1:
            raise PyroVAEError("--lr-gamma is an option of --lr-schedule step; drop it or pass that schedule")
        if self.lr_schedule != "cosine" and self.lr_min != 0:
            raise PyroVAEError("--lr-min is an option of --lr-schedule cosine; drop it or pass that schedule")
        if self.lr_schedule != "constant" and not self.fused_adam:
            # Pyro's per-parameter Adam restores each parameter's saved rate when that parameter is first
            # stepped after a resume, after any rate set before the step: the schedule could not hold there.
            raise PyroVAEError(
                "a learning-rate schedule sets the rate of the fused Adam; Pyro's per-parameter Adam "
                "(--no-fused-adam) would bring back a resumed run's old rates, so drop --no-fused-adam"
            )
        if self.eval_every is not None:
            _positive_int("TrainConfig", "eval_every", self.eval_every)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class DataConfig:
    """Where the data come from and how grey values are turned into binary ones."""

    dataset: str = "digits"
    data_dir: str | None = None
    # auto: dynamic binarization when the likelihood needs binary data and the data are grey, else none.
    binarize: str = "auto"
    # A user's data file: the SHA-256 of its bytes when the run was trained (None: a registered data set, or
    # a run from before hashes were kept), so a changed file is refused rather than scored.
    sha256: str | None = None
    # The validation points held out of the training split (io.data.hold_out): a count, a fraction in (0, 1),
    # or None (none held out; a data set with its own valid split, binarized-mnist, keeps that one).
    validation: int | float | None = None

    def __post_init__(self) -> None:
        if self.binarize not in BINARIZE_MODES:
            raise PyroVAEError(
                f"DataConfig.binarize must be one of {', '.join(BINARIZE_MODES)}, got {self.binarize!r}"
            )
        size = self.validation
        if size is not None and (
            isinstance(size, bool)
            or not isinstance(size, int | float)
            or (isinstance(size, int) and size < 1)
            or (isinstance(size, float) and not 0 < size < 1)
        ):
            raise PyroVAEError(
                f"DataConfig.validation must be a number of points (1 or more) or a fraction in (0, 1), "
                f"got {size!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["sha256"] is None:  # a registered data set: its entry as it always was
            del data["sha256"]
        if data["validation"] is None:  # nothing held out: the entry as it always was
            del data["validation"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataConfig:
        return _from_dict(cls, data)

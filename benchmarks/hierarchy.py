"""Which change lets the top layer of a hierarchical VAE learn (issue 15): one arm per change, equal budget.

Every arm trains on dynamically binarized MNIST with batch 100, Adam 1e-3 and
seed 0, then scores the first ``--eval-limit`` test images by log p̂(x) at K =
``--eval-samples`` importance samples, and reports per layer the KL share, the
active units (Var_x E_q[z_u | x] > 0.01, Burda et al., 2016) and the units
that carry KL (a unit's own E_q[log q(z_u | ...) - log p(z_u | ...)] above
``--unit-kl`` nats: the active-unit count alone counts units whose posterior
mean moves a little against a prior scale that learned to be small).

Arms (two layers ``100,50``, tanh, x <-> z1 200,200 unless the arm says):

- ``one-layer``: 784 -> 200 -> 200 -> z (50), the one-layer model of the same widths;
- ``one-layer-bias``: the same with the decoder's output bias at logit(mean training pixel);
- ``legacy``: the network before issue 15 (50,50 between z1 and z2, a plain MLP mean, torch's init);
- ``widths``: Burda et al.'s widths, 100,100 between z1 and z2, else as legacy;
- ``glorot``: widths + Glorot & Bengio initialization of the layers between z1 and z2;
- ``residual``: widths + the residual mean of p(z1 | z2) (identity at initialization), torch's init;
- ``residual-glorot``: widths + both (the new default);
- ``warmup``: widths + KL warm-up over the first ``--warmup`` epochs (Sønderby et al., 2016);
- ``output-bias``: widths + the decoder's output bias at logit(mean training pixel);
- ``default``: what ``ModelConfig`` builds now with ``--latent-dims`` (residual-glorot), plus the output bias;
- ``default-warmup``, ``default-free-bits``: ``default`` with KL warm-up over ``--warmup`` epochs, or with
  free bits of ``--free-bits`` nats per layer (Kingma et al., 2016);
- ``one-layer-bias-warmup``, ``one-layer-bias-free-bits``: the one-layer model given the same trick;
- ``ladder-L``: L = 2..5 layers (100,50,25,12,6 truncated), ladder inference, the new defaults;
- ``ladder-L-warmup``, ``ladder-L-free-bits``: the same with KL warm-up over the first ``--warmup`` epochs,
  or with free bits;
- ``ladder-L-plain``: the same with the plain top-down mean and torch's init;
- ``ARM+warmup``, ``ARM+fb``, ``ARM+lr``: any arm with KL warm-up over ``--warmup`` epochs, free bits
  of ``--free-bits`` nats per layer (Kingma et al., 2016), or Adam's rate 3e-3, in any combination;
  ``ARM+warmup5+fb0.5+lr2e-3`` gives the values.

    OMP_NUM_THREADS=1 python benchmarks/hierarchy.py --data-dir ../shared/datasets --epochs 5 --arms legacy,widths
    OMP_NUM_THREADS=1 python benchmarks/hierarchy.py --data-dir ../shared/datasets --epochs 20 --warmup 2 \
        --free-bits 2 --arms one-layer-bias-warmup,ladder-2-warmup,ladder-5-warmup+fb
    python benchmarks/hierarchy.py --smoke-test
"""

from __future__ import annotations

import argparse
import json
import time

import pyro
import torch
from pyro import poutine

from pyro_vae import ModelConfig, build_vae, evaluate_bounds, fit, load_dataset, prepare_split
from pyro_vae.inference import latent_layers
from pyro_vae.models.initialization import init_output_bias

LADDER_DIMS = (100, 50, 25, 12, 6)

# name -> (ModelConfig fields, fit options, output bias at logit(mean pixel)?)
_OLD = {"top_down": "plain", "layer_init": "torch"}
ARMS: dict[str, tuple[dict, dict, bool]] = {
    "one-layer": ({"latent_dims": (50,)}, {}, False),
    "one-layer-bias": ({"latent_dims": (50,)}, {}, True),
    "legacy": ({"layer_hidden_dims": ((50, 50),), **_OLD}, {}, False),
    "widths": (_OLD, {}, False),
    "glorot": ({"top_down": "plain", "layer_init": "glorot"}, {}, False),
    "residual": ({"top_down": "residual", "layer_init": "torch"}, {}, False),
    "residual-glorot": ({"top_down": "residual", "layer_init": "glorot"}, {}, False),
    "warmup": (_OLD, {"warmup_epochs": None}, False),
    "output-bias": (_OLD, {}, True),
    "default": ({}, {}, True),
    "default-warmup": ({}, {"warmup_epochs": None}, True),
    "one-layer-bias-warmup": ({"latent_dims": (50,)}, {"warmup_epochs": None}, True),
    "default-free-bits": ({}, {"free_bits": None}, True),
    "one-layer-bias-free-bits": ({"latent_dims": (50,)}, {"free_bits": None}, True),
    **{
        f"ladder-{n}": ({"latent_dims": LADDER_DIMS[:n], "inference": "ladder"}, {}, True)
        for n in (2, 3, 4, 5)
    },
    **{
        f"ladder-{n}-warmup": (
            {"latent_dims": LADDER_DIMS[:n], "inference": "ladder"},
            {"warmup_epochs": None},
            True,
        )
        for n in (2, 3, 5)
    },
    **{
        f"ladder-{n}-free-bits": (
            {"latent_dims": LADDER_DIMS[:n], "inference": "ladder"},
            {"free_bits": None},
            True,
        )
        for n in (2, 5)
    },
    **{
        f"ladder-{n}-plain": ({"latent_dims": LADDER_DIMS[:n], "inference": "ladder", **_OLD}, {}, True)
        for n in (3, 5)
    },
}


# Training options added to any arm by a suffix: ``default+warmup+fb`` is ``default`` with both;
# ``warmup5``, ``fb0.5``, ``lr3e-3`` give the value instead of --warmup / --free-bits / 3e-3.
MODIFIERS: dict[str, tuple[str, type, object]] = {
    "warmup": ("warmup_epochs", int, None),
    "fb": ("free_bits", float, None),
    "lr": ("lr", float, 3e-3),
}


def _modifier(text: str) -> tuple[str, object]:
    for prefix, (field, kind, default) in MODIFIERS.items():
        if text.startswith(prefix):
            value = text[len(prefix) :]
            return field, (kind(value) if value else default)
    raise ValueError(text)


def _known(name: str) -> bool:
    base, *modifiers = name.split("+")
    try:
        [_modifier(m) for m in modifiers]
    except ValueError:
        return False
    return base in ARMS


def _arm(name: str) -> tuple[dict, dict, bool]:
    base, *modifiers = name.split("+")
    fields, options, output_bias = ARMS[base]
    return fields, {**options, **dict(_modifier(m) for m in modifiers)}, output_bias


@torch.no_grad()
def unit_kl(vae: torch.nn.Module, x: torch.Tensor, *, num_samples: int) -> dict[str, torch.Tensor]:
    """Per layer, each unit's KL share [d_l]: E_x E_q[log q(z_lu | ...) - log p(z_lu | ...)] in nats.

    Every q and p of these models is a diagonal Normal, so a layer's KL splits
    into one term per unit; ``num_samples`` draws per data point (the data
    repeated, so the model's and guide's leading dimension is N * S).
    """
    x_rep = x.repeat(num_samples, 1)  # [S * N, D]
    guide_trace = poutine.trace(vae.guide).get_trace(x_rep)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x_rep)
    out = {}
    for site in vae.latent_sites:
        value = guide_trace.nodes[site]["value"]
        log_q = guide_trace.nodes[site]["fn"].base_dist.log_prob(value)  # [S * N, d]
        log_p = model_trace.nodes[site]["fn"].base_dist.log_prob(value)
        out[site] = (log_q - log_p).mean(0)
    return out


def run_arm(name: str, args: argparse.Namespace, dataset, train, test, device) -> dict:  # type: ignore[no-untyped-def]
    fields, options, output_bias = _arm(name)
    config_fields = {
        "latent_dims": args.latent_dims,
        "hidden_dims": args.hidden_dims,
        "activation": "tanh",
        **fields,
    }
    defaults = {"warmup_epochs": args.warmup, "free_bits": args.free_bits}
    options = {k: (defaults[k] if v is None else v) for k, v in options.items()}
    pyro.set_rng_seed(args.seed)
    config = ModelConfig(data_dim=dataset.input_dim, image_shape=dataset.image_shape, **config_fields)
    vae = build_vae(config)
    if output_bias:
        init_output_bias(vae, train)
    fit_options = {"lr": 1e-3, **options}
    start = time.perf_counter()
    fit(
        vae,
        train,
        epochs=args.epochs,
        batch_size=100,
        seed=args.seed,
        device=device,
        dynamic_binarization=True,
        progress=False,
        **fit_options,
    )
    seconds = time.perf_counter() - start
    pyro.set_rng_seed(args.seed)
    bounds = evaluate_bounds(vae.model, vae.guide, test, num_samples=args.eval_samples, chunk_size=100)
    summary = bounds.summary(data_dim=dataset.input_dim)
    pyro.set_rng_seed(args.seed)
    layers = latent_layers(vae.model, vae.guide, test, num_samples=100)
    per_unit = unit_kl(vae, test, num_samples=20) if hasattr(vae, "latent_sites") and len(layers) > 1 else {}
    for layer in layers:
        if layer["site"] in per_unit:
            kl_u = per_unit[layer["site"]]
            layer["units_with_kl"] = int((kl_u > args.unit_kl).sum())
            layer["unit_kl_max"] = float(kl_u.max())
    result = {
        "arm": name,
        "config": config.to_dict(),
        "fit": {key: value for key, value in fit_options.items() if value is not None},
        "output_bias": output_bias,
        "epochs": args.epochs,
        "train_images": len(train),
        "seconds": seconds,
        "nll": summary["nll"],
        "nll_stderr": summary["log_px_stderr"],
        "elbo": summary["elbo"],
        "eval_samples": args.eval_samples,
        "eval_images": len(test),
        "layers": layers,
    }
    report = "; ".join(
        f"{layer['site']} KL {layer['kl']:.2f}, {layer['active_units']}/{layer['dim']} active"
        + (f", {layer['units_with_kl']} with KL > {args.unit_kl}" if "units_with_kl" in layer else "")
        for layer in layers
    )
    print(
        f"{name}: NLL {summary['nll']:.2f} ± {summary['log_px_stderr']:.2f} (K={args.eval_samples}, "
        f"{len(test)} images), ELBO {summary['elbo']:.2f}; {report}; {args.epochs} epochs in {seconds:.0f} s",
        flush=True,
    )
    print(json.dumps(result), flush=True)
    return result


def main(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    if args.smoke_test:
        dataset = load_dataset("digits")
        args.latent_dims, args.hidden_dims = (8, 4), (16, 16)
    else:
        dataset = load_dataset("mnist", data_dir=args.data_dir)
    train = prepare_split(dataset, "train", mode="dynamic")[: args.train_limit]
    test = prepare_split(dataset, "test", mode="dynamic")[: args.eval_limit]
    arms = args.arms.split(",")
    unknown = [a for a in arms if not _known(a)]
    if unknown:
        raise SystemExit(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    return [run_arm(name, args, dataset, train.to(device), test.to(device), device) for name in arms]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="warm-up epochs of the warmup arm")
    parser.add_argument(
        "--free-bits", type=float, default=1.0, help="nats per latent layer of the free-bits arms"
    )
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--eval-limit", type=int, default=1000)
    parser.add_argument("--unit-kl", type=float, default=0.01, help="nats a unit must carry to count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke-test", action="store_true", help="digits, tiny networks, seconds")
    parsed = parser.parse_args()
    parsed.latent_dims, parsed.hidden_dims = (100, 50), (200, 200)
    if parsed.smoke_test:
        parsed.epochs, parsed.eval_samples, parsed.eval_limit, parsed.warmup = 1, 20, 50, 1
    main(parsed)

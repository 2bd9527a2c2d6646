"""beta-VAE (Higgins et al., 2017): trading rate against distortion by weighting the KL term.

Trains the same VAE once per beta in ``--betas`` on the objective

    E_q[log p(x|z)] - beta KL(q(z|x) || p(z)),

with the KL weight rising linearly from 0 to beta over ``--warmup-epochs``
(``fit(beta=..., warmup_epochs=...)``), on MNIST or Fashion-MNIST grey values
with a fixed-scale Gaussian likelihood (``--likelihood gaussian``, the squared
error of the beta-VAE paper) or on dynamically binarized images with a
Bernoulli one. Each model is then scored with beta = 1, the true bound: the
test ELBO, the rate (KL per datum, nats), the distortion (-E_q[log p(x|z)] per
datum, nats) and the number of active latent units (Var_x E_q[z_u | x] > 0.01).
beta > 1 buys a lower rate and fewer active units with more distortion, and
always a worse ELBO than beta = 1; beta < 1 the reverse.

With the Gaussian likelihood the ELBO is a log-density on [0, 1]^784 and
depends on the fixed scale (``--gaussian-scale``, 0.1 by default), so it may be
positive; compare it only between runs of the same likelihood and scale.

    python examples/beta_vae.py --data-dir ../shared/datasets --epochs 2 --warmup-epochs 1 --train-limit 10000 --eval-limit 500
    python examples/beta_vae.py --data-dir ../shared/datasets --dataset fashion-mnist --likelihood bernoulli \\
        --betas 0.5,1,2,4,8 --epochs 30 --warmup-epochs 10 --device cuda

References:
    Higgins et al., "beta-VAE: Learning Basic Visual Concepts with a Constrained
    Variational Framework", ICLR 2017.
    Alemi et al., "Fixing a Broken ELBO", ICML 2018 (the rate-distortion view).
"""

from __future__ import annotations

import argparse
import time

import pyro

from pyro_vae import ModelConfig, build_vae, evaluate_bounds, fit, load_dataset, prepare_split
from pyro_vae.inference import latent_layers
from pyro_vae.training.loop import resolve_device


def main(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    if args.smoke_test:
        dataset = load_dataset("digits")  # no files needed; same code path
        hidden = 64
    else:
        dataset = load_dataset(args.dataset, data_dir=args.data_dir)
        hidden = args.hidden_dim
    binary = args.likelihood == "bernoulli"
    mode = "dynamic" if binary else "none"
    options = {} if binary else {"scale": args.gaussian_scale}
    train = prepare_split(dataset, "train", mode=mode)[: args.train_limit]
    test = prepare_split(dataset, "test", mode=mode)[: args.eval_limit].to(device)
    what = args.likelihood if binary else f"{args.likelihood} (scale {args.gaussian_scale})"
    print(
        f"{what} VAE {dataset.input_dim}-{hidden}-{args.latent_dim} on {dataset.name}"
        f"{', dynamically binarized' if binary else ' grey values'}: {args.epochs} epochs per beta, "
        f"KL warm-up over {args.warmup_epochs}; test scores per datum, in nats, with beta = 1"
    )
    results = []
    for beta in args.betas:
        pyro.set_rng_seed(args.seed)
        vae = build_vae(
            ModelConfig(
                data_dim=dataset.input_dim,
                latent_dims=(args.latent_dim,),
                hidden_dims=(hidden,),
                likelihood=args.likelihood,
                likelihood_options=options,
                image_shape=dataset.image_shape,
            )
        )
        start = time.perf_counter()
        fit(
            vae,
            train,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            beta=beta,
            warmup_epochs=args.warmup_epochs,
            seed=args.seed,
            device=device,
            dynamic_binarization=binary,
        )
        seconds = time.perf_counter() - start
        pyro.set_rng_seed(args.seed)
        summary = evaluate_bounds(
            vae.model, vae.guide, test, num_samples=args.eval_samples, diagnostics=False
        ).summary(data_dim=dataset.input_dim)
        (layer,) = latent_layers(vae.model, vae.guide, test, num_samples=args.eval_samples)
        # ELBO = E_q[log p(x|z)] - KL, so distortion = KL - ELBO (both estimated from their own samples).
        distortion = layer["kl"] - summary["elbo"]
        results.append(
            {
                "beta": beta,
                "elbo": summary["elbo"],
                "rate": layer["kl"],
                "distortion": distortion,
                "active_units": layer["active_units"],
                "log_px": summary["log_px"],
                "seconds": seconds,
            }
        )
        print(
            f"beta {beta:>4g}: ELBO {summary['elbo']:8.2f}  rate (KL) {layer['kl']:6.2f}  "
            f"distortion {distortion:8.2f}  active units {layer['active_units']:>2}/{layer['dim']}  "
            f"log p̂(x) {summary['log_px']:8.2f} (K={args.eval_samples})  [{seconds:.0f} s]",
            flush=True,
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw or FashionMNIST/raw")
    parser.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default="mnist")
    parser.add_argument("--likelihood", choices=("gaussian", "bernoulli"), default="gaussian")
    parser.add_argument("--gaussian-scale", type=float, default=0.1)
    parser.add_argument("--betas", type=lambda s: [float(b) for b in s.split(",")], default=[0.5, 1.0, 4.0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--warmup-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden-dim", type=int, default=400)
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--eval-samples", type=int, default=100)
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--eval-limit", type=int, default=None, help="score only the first N test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke-test", action="store_true", help="digits, a tiny network, seconds")
    args = parser.parse_args()
    if args.smoke_test:
        args.epochs, args.warmup_epochs, args.eval_samples, args.eval_limit = 1, 1, 20, 50
    main(args)

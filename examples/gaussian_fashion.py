"""Four likelihoods for Fashion-MNIST's 8-bit grey values, and why their log p̂(x) differ in kind.

Trains the same VAE (x (784) -> 400 -> z (20) and back, N(0, I) prior) on
Fashion-MNIST grey values k/255 with four likelihoods p(x | z):

- ``gaussian``: N(mu(z), s^2) with a fixed s (``--gaussian-scale``), the squared error;
- ``gaussian-learned-scale``: N(mu(z), sigma(z)^2), sigma from the decoder, floored at 1e-3;
- ``continuous-bernoulli``: the normalized density on [0, 1] (Loaiza-Ganem & Cunningham, 2019);
- ``discretized-logistic``: a logistic rounded to the 256 levels k/255, a probability mass function.

and reports each one's test log p̂(x) per image, in nats, from importance sampling.

The first three are densities on [0, 1]^D (D = 784); the last is a pmf over
{0, 1/255, ..., 1}^D. The numbers differ in kind:

- A pmf has log P(x) <= 0, and -log P(x) / (D ln 2) is the bits per dimension
  of the image-modelling literature on the 0..255 scale.
- A density is not a probability: log p(x) can be positive and grows without
  bound where the data pile up on one value (most background pixels are
  exactly 0, and a learned scale shrinks onto them until its floor: up to
  -ln(1e-3 sqrt(2 pi)) = 5.99 nats per pixel). Evaluated at the grid points
  themselves, it bounds no discrete likelihood.
- Changing variables to y = 255 x (the 0..255 scale) divides a density by
  255^D, so log p(y) = log p(x) - D ln 255; under the dequantization
  convention of Theis et al. (2016), y = (k + u) / 256 with u ~ U[0, 1), the
  scale is 256 and log p(y) = log p(x) - D ln 256. The latter lower-bounds
  log P(k) of a discrete model only when p is trained and evaluated on
  dequantized data (x + u / 256), which the three densities here are not.

The script prints, for all four, bits/dim = (-log p̂(x) + D ln 255) / (D ln 2):
the pmf's exact bits per dimension, and for the densities the same formula
with the 255 convention, marked as a density figure, which is not comparable
with it.

    python examples/gaussian_fashion.py --data-dir ../shared/datasets --epochs 2 --train-limit 10000 --eval-limit 200
    python examples/gaussian_fashion.py --data-dir ../shared/datasets --epochs 50 --device cuda

References:
    Loaiza-Ganem & Cunningham, "The continuous Bernoulli: fixing a pervasive error
    in variational autoencoders", NeurIPS 2019.
    Salimans, Karpathy, Chen & Kingma, "PixelCNN++", ICLR 2017 (discretized logistic).
    Theis, van den Oord & Bethge, "A note on the evaluation of generative models", ICLR 2016.
"""

from __future__ import annotations

import argparse
import math
import time

import pyro
import torch

from pyro_vae import ModelConfig, build_vae, evaluate_bounds, fit, load_dataset, prepare_split
from pyro_vae.training.loop import resolve_device

LIKELIHOODS = ("gaussian", "gaussian-learned-scale", "continuous-bernoulli", "discretized-logistic")


def main(args: argparse.Namespace) -> dict[str, dict]:
    device = resolve_device(args.device)
    if args.smoke_test:
        dataset = load_dataset("digits")  # no files needed; same code path
        hidden, latent = 64, 8
    else:
        dataset = load_dataset("fashion-mnist", data_dir=args.data_dir)
        hidden, latent = args.hidden_dim, args.latent_dim
    train = prepare_split(dataset, "train", mode="none")[: args.train_limit]
    test = prepare_split(dataset, "test", mode="none")[: args.eval_limit]
    if args.smoke_test:
        # The digits' 17 grey levels k/16 lie off the 8-bit grid k/255 that the discretized logistic is over.
        train, test = (torch.round(x * 255) / 255 for x in (train, test))
    test = test.to(device)
    d = dataset.input_dim
    print(
        f"VAE {d}-{hidden}-{latent} on {dataset.name} grey values k/255, {args.epochs} epochs each; "
        f"test log p̂(x) per image in nats (K={args.eval_samples}); D ln 255 = {d * math.log(255):.1f} nats"
    )
    results = {}
    for likelihood in args.likelihoods:
        options = {"scale": args.gaussian_scale} if likelihood == "gaussian" else {}
        pyro.set_rng_seed(args.seed)
        vae = build_vae(
            ModelConfig(
                data_dim=d,
                latent_dims=(latent,),
                hidden_dims=(hidden,),
                likelihood=likelihood,
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
            seed=args.seed,
            device=device,
        )
        seconds = time.perf_counter() - start
        pyro.set_rng_seed(args.seed)
        bounds = evaluate_bounds(vae.model, vae.guide, test, num_samples=args.eval_samples, chunk_size=500)
        pmf = likelihood == "discretized-logistic"
        summary = bounds.summary(data_dim=d, bits_scale=1.0 if pmf else 255.0)
        results[likelihood] = {**summary, "seconds": seconds}
        kind = "a pmf on 0..255" if pmf else "as a density on [0, 255]^D, not a pmf"
        print(
            f"{likelihood:>22}: log p̂(x) {summary['log_px']:9.2f} ± {summary['log_px_stderr']:.2f}, "
            f"ELBO {summary['elbo']:9.2f}; {summary['bits_per_dim']:.3f} bits/dim ({kind})  [{seconds:.0f} s]",
            flush=True,
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir", default=None, help="folder holding FashionMNIST/raw (torchvision's layout)"
    )
    parser.add_argument("--likelihoods", type=lambda s: s.split(","), default=list(LIKELIHOODS))
    parser.add_argument("--gaussian-scale", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden-dim", type=int, default=400)
    parser.add_argument("--latent-dim", type=int, default=20)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--eval-limit", type=int, default=None, help="score only the first N test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke-test", action="store_true", help="digits on the 8-bit grid, seconds")
    args = parser.parse_args()
    if args.smoke_test:
        args.epochs, args.eval_samples, args.eval_limit = 1, 50, 50
    main(args)

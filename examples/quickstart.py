"""A VAE in a few lines of the public API: build, fit by SVI, judge by importance-sampled log p(x).

Trains a Bernoulli VAE on the 8x8 digits that ship with scikit-learn (binarized
dynamically), then reports the test ELBO, IWAE bounds and log p̂(x) per datum.

    python examples/quickstart.py --epochs 100
"""

from __future__ import annotations

import argparse

import pyro

from pyro_vae import ModelConfig, build_vae, evaluate_bounds, fit, load_dataset, prepare_split


def main(args: argparse.Namespace) -> dict:
    pyro.set_rng_seed(args.seed)
    digits = load_dataset("digits")
    train = prepare_split(digits, "train", mode="dynamic")  # grey; a fresh binary draw every step
    test = prepare_split(digits, "test", mode="dynamic")  # binarized once, with a fixed seed
    vae = build_vae(
        ModelConfig(data_dim=digits.input_dim, latent_dims=(args.latent_dim,), hidden_dims=(200,))
    )
    result = fit(vae, train, test=test, epochs=args.epochs, dynamic_binarization=True, seed=args.seed)
    bounds = evaluate_bounds(vae.model, vae.guide, test.to(result.device), num_samples=args.num_samples)
    summary = bounds.summary(data_dim=digits.input_dim)
    print(
        f"test ELBO {summary['elbo']:.2f}, IWAE-50 {summary['iwae'].get('50', float('nan')):.2f}, "
        f"log p(x) {summary['log_px']:.2f} ± {summary['log_px_stderr']:.2f} nats per datum"
    )
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke-test", action="store_true", help="a few seconds' run, for the test suite")
    args = parser.parse_args()
    if args.smoke_test:
        args.epochs, args.num_samples = 2, 50
    main(args)

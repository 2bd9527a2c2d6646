"""Test log p(x) of priors x likelihoods trained with the same budget.

Trains one VAE per (prior, likelihood) pair with identical networks, epochs,
batch size, learning rate and seed, then estimates the test log p̂(x) by
importance sampling (K samples per datum) and prints a markdown table.

Bernoulli rows are scored on binary images (dynamically binarized for training,
binarized once with a fixed seed for testing); continuous-Bernoulli rows on the
grey values themselves. A probability mass and a density are not on the same
scale, so compare priors within a likelihood, not likelihoods with each other.

    python benchmarks/compare_components.py --dataset digits --epochs 200
    python benchmarks/compare_components.py --dataset binarized-mnist --data-dir ../shared/datasets \
        --likelihoods bernoulli --epochs 50 --device cuda
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch

from pyro_vae import (
    LIKELIHOODS,
    ModelConfig,
    build_vae,
    evaluate_bounds,
    fit,
    load_dataset,
    prepare_split,
    resolve_binarize,
)
from pyro_vae.training.loop import resolve_device


def main(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    dataset = load_dataset(args.dataset, data_dir=args.data_dir)
    rows = []
    for likelihood in args.likelihoods.split(","):
        mode = resolve_binarize(
            "auto", dataset=dataset, likelihood_binary=LIKELIHOODS.get(likelihood).binary_data
        )
        train = prepare_split(dataset, "train", mode=mode)
        test = prepare_split(dataset, "test", mode=mode)[: args.limit]
        for prior in args.priors.split(","):
            pyro.set_rng_seed(args.seed)
            config = ModelConfig(
                data_dim=dataset.input_dim,
                latent_dims=(args.latent_dim,),
                hidden_dims=tuple(int(h) for h in args.hidden_dims.split(",")),
                prior=prior,
                likelihood=likelihood,
                image_shape=dataset.image_shape,
            )
            vae = build_vae(config)
            start = time.perf_counter()
            fit(
                vae,
                train,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
                device=device,
                dynamic_binarization=mode == "dynamic",
                progress=False,
            )
            seconds = time.perf_counter() - start
            pyro.set_rng_seed(args.seed)
            bounds = evaluate_bounds(vae.model, vae.guide, test.to(device), num_samples=args.num_samples)
            s = bounds.summary(data_dim=dataset.input_dim)
            rows.append({"likelihood": likelihood, "prior": prior, "binarize": mode, "seconds": seconds, **s})
            print(
                f"{likelihood:>20} {prior:>16}: log p(x) {s['log_px']:9.3f} ± {s['log_px_stderr']:.3f}, "
                f"ELBO {s['elbo']:9.3f}, k-hat>0.7 {100 * s['khat_frac_above_0_7']:.1f}%, {seconds:.0f} s",
                flush=True,
            )
    print(
        f"\n{args.dataset}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, latent {args.latent_dim}, "
        f"hidden {args.hidden_dims}, K = {args.num_samples}, device {device}, torch {torch.__version__}\n"
    )
    print("| likelihood | data | prior | test ELBO | IWAE-50 | test log p̂(x) ± s.e. | k̂ > 0.7 | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        data = "binary" if r["binarize"] != "none" else "grey"
        print(
            f"| {r['likelihood']} | {data} | {r['prior']} | {r['elbo']:.2f} | {r['iwae'].get('50', float('nan')):.2f} "
            f"| {r['log_px']:.2f} ± {r['log_px_stderr']:.2f} | {100 * r['khat_frac_above_0_7']:.0f}% "
            f"| {r['seconds']:.0f} |"
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--priors", default="standard-normal,mixture,vamp")
    parser.add_argument("--likelihoods", default="bernoulli,continuous-bernoulli")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--hidden-dims", default="200")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N test points")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.epochs, args.num_samples, args.limit = 1, 20, 20
    main(args)

"""Three priors under one budget: N(0, I), a mixture of Gaussians and the VampPrior, by test log p̂(x).

The setting of Tomczak & Welling (2018) on dynamically binarized MNIST, with
plain MLPs in place of their gated layers: x (784) -> 300 -> 300 -> z (40) and
back, a Bernoulli likelihood, and three priors p(z) trained with the same
networks, epochs, seed and optimizer:

- ``standard-normal``: N(0, I);
- ``mixture``: K learned diagonal Gaussians with learned weights (their "MoG");
- ``vamp``: (1/K) sum_k q(z | u_k), the guide's posterior at K learned
  pseudo-inputs u_k, initialized around 0.05 as in the paper for MNIST.

K is ``--prior-components`` (500 in the paper). Each model is scored by its
test log p̂(x) with ``--eval-samples`` importance samples per image (the paper
uses 5000), the ELBO and the KL per datum beside it.

    python examples/vamp_prior.py --data-dir ../shared/datasets --epochs 2 --train-limit 10000 --eval-limit 200
    python examples/vamp_prior.py --data-dir ../shared/datasets --epochs 200 --warmup-epochs 100 --device cuda

References:
    Tomczak & Welling, "VAE with a VampPrior", AISTATS 2018, arXiv:1705.07120.
"""

from __future__ import annotations

import argparse
import time

import pyro

from pyro_vae import ModelConfig, build_vae, evaluate_bounds, fit, load_dataset, prepare_split
from pyro_vae.inference.importance import latent_layers_within
from pyro_vae.inference.traces import MAX_MEMORY
from pyro_vae.resources import memory_size
from pyro_vae.training.loop import resolve_device


def main(args: argparse.Namespace) -> dict[str, dict]:
    device = resolve_device(args.device)
    if args.smoke_test:
        dataset = load_dataset("digits")  # no files needed; same code path
        hidden, latent = (32, 32), 4
    else:
        dataset = load_dataset("mnist", data_dir=args.data_dir)
        hidden, latent = (300, 300), args.latent_dim
    train = prepare_split(dataset, "train", mode="dynamic")[: args.train_limit]
    test = prepare_split(dataset, "test", mode="dynamic")[: args.eval_limit].to(device)
    k = args.prior_components
    priors = {
        "standard-normal": {},
        "mixture": {"num_components": k},
        "vamp": {"num_components": k, "pseudo_input_mean": 0.05},
    }
    print(
        f"Bernoulli VAE {dataset.input_dim}-{'-'.join(map(str, hidden))}-{latent} on dynamically binarized "
        f"{dataset.name}, {args.epochs} epochs each, K={k} components; test scores per datum in nats"
    )
    results = {}
    for prior, options in priors.items():
        pyro.set_rng_seed(args.seed)
        vae = build_vae(
            ModelConfig(
                data_dim=dataset.input_dim,
                latent_dims=(latent,),
                hidden_dims=hidden,
                prior=prior,
                prior_options=options,
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
            warmup_epochs=args.warmup_epochs,
            seed=args.seed,
            device=device,
            dynamic_binarization=True,
        )
        seconds = time.perf_counter() - start
        pyro.set_rng_seed(args.seed)
        # log p(z) under a K-component prior holds a [rows, K, latent] tensor: the passes are sized to the
        # memory budget (--max-memory, default 2 GiB) from that measured cost, here about 9,000 rows a pass.
        bounds = evaluate_bounds(
            vae.model, vae.guide, test, num_samples=args.eval_samples, max_memory=args.max_memory
        )
        summary = bounds.summary(data_dim=dataset.input_dim)
        (layer,) = latent_layers_within(
            vae.model, vae.guide, test, num_samples=10, max_memory=args.max_memory
        )
        results[prior] = {
            **summary,
            "kl": layer["kl"],
            "active_units": layer["active_units"],
            "seconds": seconds,
        }
        print(
            f"{prior:>15}: log p̂(x) {summary['log_px']:8.2f} ± {summary['log_px_stderr']:.2f} "
            f"(NLL {summary['nll']:.2f}, K={args.eval_samples}), ELBO {summary['elbo']:8.2f}, "
            f"KL {layer['kl']:.2f}, active units {layer['active_units']}/{layer['dim']}  [{seconds:.0f} s]",
            flush=True,
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (torchvision's layout)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--warmup-epochs", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--latent-dim", type=int, default=40)
    parser.add_argument("--prior-components", type=int, default=500)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument(
        "--max-memory",
        type=memory_size,
        default=MAX_MEMORY,
        help="bytes (or 2GiB, 512MiB) the evaluation's passes may add",
    )
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--eval-limit", type=int, default=None, help="score only the first N test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke-test", action="store_true", help="digits, tiny networks, seconds")
    args = parser.parse_args()
    if args.smoke_test:
        args.epochs, args.prior_components, args.eval_samples, args.eval_limit = 1, 10, 50, 50
    main(args)

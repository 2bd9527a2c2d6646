"""VAE vs IWAE objectives at K samples per datum (Burda et al., 2016, table 1, one stochastic layer).

The one-layer architecture of Burda et al. on dynamically binarized MNIST,
x (784) -> 200 -> 200 -> z (50) and back, tanh units, Bernoulli likelihood,
trained for each K in ``--ks`` with

- the VAE bound with K samples, (1/K) sum_k log w_k (``fit(loss="elbo", num_particles=K)``);
- the IWAE bound, log (1/K) sum_k w_k (``fit(loss="iwae", num_particles=K)``),

where w_k = p(x, z_k) / q(z_k | x). At K = 1 the two are the same objective,
so it is trained once. Each model is scored by its test NLL at
``--eval-samples`` importance samples (the paper's 5000) and its number of
active units (Var_x E_q[z_u | x] > 0.01, section 5.2): the IWAE bound, which
penalizes a guide less for missing posterior mass, keeps more units active
and reaches a lower NLL as K grows.

Burda et al. train for 3,280 passes (3^i for i = 0..7) with batches of 20; the short runs
here show the direction of the effect, not their numbers. The command line
mirrors the CLI's ``--loss iwae --num-particles K``.

    python examples/iwae.py --data-dir ../shared/datasets --ks 1,5 --epochs 2 --train-limit 10000 --eval-limit 200
    python examples/iwae.py --data-dir ../shared/datasets --epochs 100 --device cuda

References:
    Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016, arXiv:1509.00519.
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
        hidden, latent = (32, 32), 8
    else:
        dataset = load_dataset("mnist", data_dir=args.data_dir)
        hidden, latent = (200, 200), 50
    train = prepare_split(dataset, "train", mode="dynamic")[: args.train_limit]
    test = prepare_split(dataset, "test", mode="dynamic")[: args.eval_limit].to(device)
    runs = [(loss, k) for k in args.ks for loss in ("elbo", "iwae") if not (loss == "iwae" and k == 1)]
    print(
        f"Bernoulli VAE {dataset.input_dim}-{'-'.join(map(str, hidden))}-{latent} (tanh) on dynamically "
        f"binarized {dataset.name}, {args.epochs} epochs each; test NLL per datum in nats at "
        f"K={args.eval_samples}"
    )
    results = []
    for loss, k in runs:
        pyro.set_rng_seed(args.seed)
        vae = build_vae(
            ModelConfig(
                data_dim=dataset.input_dim,
                latent_dims=(latent,),
                hidden_dims=hidden,
                activation="tanh",
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
            loss=loss,
            num_particles=k,
            seed=args.seed,
            device=device,
            dynamic_binarization=True,
        )
        seconds = time.perf_counter() - start
        pyro.set_rng_seed(args.seed)
        bounds = evaluate_bounds(vae.model, vae.guide, test, num_samples=args.eval_samples, chunk_size=500)
        summary = bounds.summary(data_dim=dataset.input_dim)
        (layer,) = latent_layers(vae.model, vae.guide, test, num_samples=100)
        name = "VAE" if loss == "elbo" else "IWAE"
        results.append(
            {"objective": name, "k": k, "seconds": seconds, **summary, "active_units": layer["active_units"]}
        )
        print(
            f"{name:>4} K={k:<3}: NLL {summary['nll']:7.2f} ± {summary['log_px_stderr']:.2f}, "
            f"ELBO {summary['elbo']:8.2f}, KL {layer['kl']:6.2f}, "
            f"active units {layer['active_units']:>2}/{layer['dim']}  [{seconds:.0f} s]",
            flush=True,
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (torchvision's layout)")
    parser.add_argument("--ks", type=lambda s: [int(k) for k in s.split(",")], default=[1, 5, 50])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-samples", type=int, default=5000)
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--eval-limit", type=int, default=None, help="score only the first N test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke-test", action="store_true", help="digits, tiny networks, seconds")
    args = parser.parse_args()
    if args.smoke_test:
        args.ks, args.epochs, args.eval_samples, args.eval_limit = [1, 5], 1, 50, 50
    main(args)

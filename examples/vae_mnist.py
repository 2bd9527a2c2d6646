"""The classic VAE of Kingma & Welling (2014) on dynamically binarized MNIST, judged by log p̂(x).

The architecture is the paper's MNIST one (section 5 and appendix C): one
hidden layer of 500 tanh units in the encoder and in the decoder, a 20-dimensional
Gaussian latent (one of the paper's N_z in {3, 5, 10, 20, 200}), N(0, I) prior
and a Bernoulli likelihood, x (784) -> 500 -> z (20) -> 500 -> x. It is trained
here with Adam and minibatches of 100 rather than the paper's Adagrad, on grey
MNIST binarized afresh at every step. The test set is binarized once with a
fixed seed and scored with ``--eval-samples`` importance samples per image:
ELBO, IWAE-k, log p̂(x) with its Monte-Carlo standard error, and the PSIS k̂
of the importance weights, whose tail says when that error cannot be trusted.
``--out DIR`` also saves a grid of samples from the model and one of test
images above their reconstructions.

    python examples/vae_mnist.py --data-dir ../shared/datasets --epochs 2 --eval-limit 200
    python examples/vae_mnist.py --data-dir ../shared/datasets --epochs 100 --device cuda --out vae-mnist

References:
    Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014, arXiv:1312.6114.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyro
import torch
from torchvision.utils import save_image

from pyro_vae import ModelConfig, build_vae, evaluate_bounds, fit, load_dataset, prepare_split
from pyro_vae.training.loop import resolve_device


def save_grids(vae, test: torch.Tensor, image_shape: tuple[int, ...], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    samples = vae.sample(64).cpu()
    originals = test[:32].cpu()
    reconstructions = vae.reconstruct(test[:32]).cpu()
    paths = [out / "samples.png", out / "reconstructions.png"]
    save_image(samples.reshape(-1, 1, *image_shape), paths[0], nrow=8)
    # Rows of 8: originals and their reconstructions alternate, so each pair sits one above the other.
    pairs = torch.stack([originals.reshape(4, 8, -1), reconstructions.reshape(4, 8, -1)], dim=1)
    save_image(pairs.reshape(-1, 1, *image_shape), paths[1], nrow=8)
    return paths


def main(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    if args.smoke_test:
        dataset = load_dataset("digits")  # no files needed; same code path
        hidden, latent = 64, 8
    else:
        dataset = load_dataset("mnist", data_dir=args.data_dir)
        hidden, latent = args.hidden_dim, args.latent_dim
    train = prepare_split(dataset, "train", mode="dynamic")
    test = prepare_split(dataset, "test", mode="dynamic")[: args.eval_limit].to(device)
    pyro.set_rng_seed(args.seed)
    vae = build_vae(
        ModelConfig(
            data_dim=dataset.input_dim,
            latent_dims=(latent,),
            hidden_dims=(hidden,),
            activation="tanh",
            image_shape=dataset.image_shape,
        )
    )
    start = time.perf_counter()
    result = fit(
        vae,
        train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=device,
        dynamic_binarization=True,
    )
    seconds = time.perf_counter() - start
    pyro.set_rng_seed(args.seed)
    bounds = evaluate_bounds(vae.model, vae.guide, test, num_samples=args.eval_samples, chunk_size=500)
    summary = bounds.summary(data_dim=dataset.input_dim)
    iwae = ", ".join(f"IWAE-{k} {value:.2f}" for k, value in summary["iwae"].items() if k != "1")
    print(
        f"Bernoulli VAE {dataset.input_dim}-{hidden}-{latent} (tanh) on dynamically binarized {dataset.name}: "
        f"{args.epochs} epochs in {seconds:.0f} s on {device}, final train ELBO {result.final.train_elbo:.2f}"
    )
    khat = (
        f"PSIS k̂ max {summary['khat_max']:.2f}, {100 * summary['khat_frac_above_0_7']:.0f}% of images above 0.7"
        if summary["khat_max"] is not None
        else "PSIS k̂ needs more samples"
    )
    print(
        f"test ({summary['num_data']} images, K={args.eval_samples}), per datum: ELBO {summary['elbo']:.2f}, "
        f"{iwae}; log p̂(x) {summary['log_px']:.2f} ± {summary['log_px_stderr']:.2f} nats, "
        f"NLL {summary['nll']:.2f} nats ({summary['bits_per_dim']:.4f} bits/dim); {khat}"
    )
    if args.out is not None:
        paths = save_grids(vae, test, dataset.image_shape, Path(args.out))
        print("saved " + ", ".join(str(p) for p in paths))
    return {"seconds": seconds, "history": result.history, **summary}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (torchvision's layout)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden-dim", type=int, default=500)
    parser.add_argument("--latent-dim", type=int, default=20)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--eval-limit", type=int, default=None, help="score only the first N test images")
    parser.add_argument("--out", default=None, help="save samples.png and reconstructions.png here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke-test", action="store_true", help="digits, a tiny network, seconds")
    args = parser.parse_args()
    if args.smoke_test:
        args.epochs, args.eval_samples, args.eval_limit = 2, 50, 50
    main(args)

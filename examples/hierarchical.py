"""Two stochastic layers on MNIST: the network of Burda et al. (2016), section 5.

    x (784) -> 200 -> 200 -> z1 (100) -> 100 -> 100 -> z2 (50), tanh units,

for q(z1 | x) and q(z2 | z1), and the mirrored generative path
z2 -> 100 -> 100 -> z1 -> 200 -> 200 -> x for p(z1 | z2) and p(x | z1), with a
Bernoulli likelihood on dynamically binarized MNIST; the layers between z1 and
z2 start from Glorot & Bengio's initialization, as Burda et al.'s did. Two
additions to their network, both defaults here because without them z2 goes
unused at small budgets (benchmarks/README.md, "Hierarchical latents"): the mean
of p(z1 | z2) has a linear path that starts as the identity (``--top-down
residual``; ``plain`` is Burda et al.'s exactly), and the decoder's output bias
starts at the logit of the mean training pixel. Trained once with the ELBO
(``--loss elbo``), its KL weight rising from 0 to 1 over the first
``--warmup-epochs`` (2; Sønderby et al., 2016), and once with the
importance-weighted bound (``--loss iwae --num-particles 5``), and scored by the test NLL at K = 5000 importance
samples, with the KL and active units of each layer.

Burda et al. train for 3,280 passes over the data (3^i passes for i = 0..7,
the learning rate falling at each stage); the short default
here (a few epochs on a CPU) runs the same experiment at a small budget, so
expect NLLs well above their table's: raise ``--epochs`` on a GPU.

    python examples/hierarchical.py --data-dir ../shared/datasets --epochs 5 --eval-limit 500
    python examples/hierarchical.py --data-dir ../shared/datasets --epochs 300 --device cuda --eval-samples 5000
"""

from __future__ import annotations

import argparse
import time

import pyro

from pyro_vae import ModelConfig, build_vae, evaluate_bounds, fit, load_dataset, prepare_split
from pyro_vae.inference import latent_layers
from pyro_vae.models.initialization import init_output_bias
from pyro_vae.training.loop import resolve_device


def main(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    if args.smoke_test:
        dataset = load_dataset("digits")  # no files needed; same code path
        hidden, latents = (32, 32), (16, 8)
    else:
        dataset = load_dataset("mnist", data_dir=args.data_dir)
        hidden, latents = (200, 200), (100, 50)  # z1 <-> z2: 100, 100 (the default)
    train = prepare_split(dataset, "train", mode="dynamic")
    test = prepare_split(dataset, "test", mode="dynamic")[: args.eval_limit].to(device)
    results = []
    for loss, particles in (("elbo", 1), ("iwae", 5)):
        pyro.set_rng_seed(args.seed)
        config = ModelConfig(
            data_dim=dataset.input_dim,
            latent_dims=latents,
            hidden_dims=hidden,
            activation="tanh",
            inference=args.inference,
            top_down=args.top_down,
            image_shape=dataset.image_shape,
        )
        vae = build_vae(config)
        init_output_bias(vae, train)
        start = time.perf_counter()
        fit(
            vae,
            train,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            loss=loss,
            num_particles=particles,
            # The KL weight rises from 0 to 1 over the first epochs (Sønderby et al., 2016); the IWAE
            # bound has no KL term to weigh, so its run has none.
            warmup_epochs=args.warmup_epochs if loss == "elbo" else 0,
            seed=args.seed,
            device=device,
            dynamic_binarization=True,
        )
        seconds = time.perf_counter() - start
        pyro.set_rng_seed(args.seed)
        bounds = evaluate_bounds(vae.model, vae.guide, test, num_samples=args.eval_samples, chunk_size=500)
        summary = bounds.summary(data_dim=dataset.input_dim)
        layers = latent_layers(vae.model, vae.guide, test, num_samples=100)
        results.append({"loss": loss, "k": particles, "seconds": seconds, **summary, "layers": layers})
        active = ", ".join(
            f"{layer['site']}: {layer['active_units']}/{layer['dim']} active, KL {layer['kl']:.2f}"
            for layer in layers
        )
        print(
            f"--loss {loss} (K={particles}): test NLL {summary['nll']:.2f} ± {summary['log_px_stderr']:.2f} nats "
            f"(K={args.eval_samples}, {summary['num_data']} test images), ELBO {summary['elbo']:.2f}; "
            f"{active}; trained {args.epochs} epochs in {seconds:.0f} s on {device}",
            flush=True,
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-epochs", type=int, default=2, help="KL warm-up of the ELBO run (0: none)")
    parser.add_argument("--inference", choices=("bottom-up", "ladder"), default="bottom-up")
    parser.add_argument(
        "--top-down", choices=("residual", "plain"), default="residual", help="plain: Burda et al.'s exactly"
    )
    parser.add_argument("--eval-samples", type=int, default=5000)
    parser.add_argument("--eval-limit", type=int, default=None, help="score only the first N test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke-test", action="store_true", help="digits, tiny networks, seconds")
    args = parser.parse_args()
    if args.smoke_test:
        args.epochs, args.eval_samples, args.eval_limit, args.warmup_epochs = 2, 50, 50, 1
    main(args)

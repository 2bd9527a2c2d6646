"""Semi-supervised M2 (Kingma et al., 2014) on MNIST: y observed for a few labelled images, summed out for the rest.

The labelled minibatches train the ELBO L(x, y) and the classification term
alpha log q(y | x); the unlabelled ones the ELBO with y enumerated,
U(x) = sum_y q(y | x) (L(x, y) - log q(y | x)), which ``make_loss("elbo")``
computes with TraceEnum_ELBO (y summed out exactly, no score-function noise).
Reports the test accuracy of argmax_y q(y | x) and the test log p̂(x) of the
unlabelled model, log sum_y p(y) ∫ p(z) p(x | y, z) dz, by importance sampling
with y summed out. The architecture is the Pyro tutorial's (one hidden layer of
500 softplus units, a 50-dimensional z), images binarized afresh at every step;
the unlabelled set is the whole training set (the labelled images among it), and
``--labels`` images, as many of each class, carry their labels.

    python examples/ss_vae_m2.py --data-dir ../shared/datasets --labels 3000 --epochs 2
    python examples/ss_vae_m2.py --data-dir DATASETS --labels 100 --epochs 100 --device cuda

References:
    Kingma, Rezende, Mohamed & Welling, "Semi-Supervised Learning with Deep
    Generative Models", NeurIPS 2014.
"""

from __future__ import annotations

import argparse
import time

import pyro
import pyro.optim
import torch
from pyro.infer import SVI

from pyro_vae import evaluate_bounds, load_dataset, make_loss, prepare_split
from pyro_vae.components.guides import DiagonalNormal
from pyro_vae.components.likelihoods import LIKELIHOODS
from pyro_vae.components.nets import MLP
from pyro_vae.models.semisupervised import SemiSupervisedVAE
from pyro_vae.training.loop import resolve_device


def balanced_labels(labels: torch.Tensor, num: int, *, num_classes: int, seed: int) -> torch.Tensor:
    """Indices of ``num`` labelled points, num / K of each class, drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    per_class = num // num_classes
    chosen = []
    for k in range(num_classes):
        rows = (labels == k).nonzero().squeeze(-1)
        chosen.append(rows[torch.randperm(len(rows), generator=generator)[:per_class]])
    return torch.cat(chosen)


def build(data_dim: int, *, hidden: int, latent: int, num_classes: int, alpha: float) -> SemiSupervisedVAE:
    encoder = MLP(data_dim, [hidden])
    return SemiSupervisedVAE(
        num_classes=num_classes,
        latent_dim=latent,
        likelihood=LIKELIHOODS.get("bernoulli")(data_dim=data_dim),
        encoder=encoder,
        guide_head=DiagonalNormal(feature_dim=encoder.out_dim + num_classes, latent_dim=latent),
        decoder=MLP(latent + num_classes, [hidden], data_dim),
        alpha=alpha,
    )


def main(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    if args.smoke_test:
        dataset = load_dataset("digits")  # no files needed; same code path
        hidden, latent, epochs, num_labels = 32, 4, 1, 100
    else:
        dataset = load_dataset("mnist", data_dir=args.data_dir)
        hidden, latent, epochs, num_labels = args.hidden_dim, args.latent_dim, args.epochs, args.labels
    pyro.set_rng_seed(args.seed)
    train = prepare_split(dataset, "train", mode="dynamic").to(device)  # grey values, binarized per step
    labels = dataset.labels("train").to(device)
    num_classes = int(labels.max()) + 1
    labelled = balanced_labels(labels.cpu(), num_labels, num_classes=num_classes, seed=args.seed).to(device)
    test = prepare_split(dataset, "test", mode="static").to(device)  # accuracy on all of it
    test_labels = dataset.labels("test").to(device)
    alpha = 0.1 * train.shape[0] if args.alpha is None else args.alpha
    m2 = build(train.shape[1], hidden=hidden, latent=latent, num_classes=num_classes, alpha=alpha).to(device)
    optim = pyro.optim.Adam({"lr": args.lr})
    svi = SVI(m2.model, m2.guide, optim, loss=make_loss("elbo"))
    classify = SVI(m2.classifier_model, m2.no_guide, optim, loss=make_loss("elbo"))
    x_lab, y_lab = train[labelled], labels[labelled]
    num_unlabelled = train.shape[0]
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(num_unlabelled, device=device)
        total, batches = 0.0, order.split(args.batch_size)
        for batch in batches:
            # One unlabelled step (y summed out), one labelled step and one classifier step.
            total += svi.step(torch.bernoulli(train[batch]), num_data=num_unlabelled)
            rows = torch.randint(0, len(labelled), (min(args.batch_size, len(labelled)),), device=device)
            x = torch.bernoulli(x_lab[rows])
            svi.step(x, y_lab[rows], num_data=len(labelled))
            classify.step(x, y_lab[rows], num_data=len(labelled))
        accuracy = float((m2.predict(test) == test_labels).double().mean())
        # Each step's loss estimates the whole unlabelled set's: their mean over the epoch, per datum.
        elbo = -total / len(batches) / num_unlabelled
        print(f"epoch {epoch}: unlabelled ELBO {elbo:.2f} nats per datum, test accuracy {accuracy:.4f}")
    seconds = time.perf_counter() - start
    scored = test[: args.eval_limit]  # log p(x) on the first --eval-limit images
    bounds = evaluate_bounds(m2.model, m2.guide, scored, num_samples=args.eval_samples, progress=False)
    summary = bounds.summary()
    accuracy = float((m2.predict(test) == test_labels).double().mean())
    print(
        f"{num_labels} labels, {epochs} epochs in {seconds:.0f} s on {device}: test accuracy {accuracy:.4f}; "
        f"test log p(x) = {summary['log_px']:.2f} nats (K={args.eval_samples}, y summed out, "
        f"{len(scored)} images)"
    )
    return {"accuracy": accuracy, "log_px": summary["log_px"], "seconds": seconds}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/datasets")
    parser.add_argument("--labels", type=int, choices=(100, 600, 1000, 3000), default=100)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    # Kingma et al. (2014) weigh the classifier's sum over the labelled points by alpha = 0.1 N against
    # ELBOs summed over the whole data set, as the losses here are (each minibatch scaled to its set).
    parser.add_argument("--alpha", type=float, default=None, help="default 0.1 N (N training images)")
    parser.add_argument("--hidden-dim", type=int, default=500)
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--eval-samples", type=int, default=100)
    parser.add_argument("--eval-limit", type=int, default=10000, help="test images scored by log p(x)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke-test", action="store_true", help="one epoch on the bundled digits")
    main(parser.parse_args())

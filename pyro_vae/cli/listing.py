"""``pyro-vae list``: every registered prior, likelihood, guide, network, loss, evaluator and data set."""

from __future__ import annotations

import argparse
from typing import Any

from ..components.guides import GUIDES
from ..components.likelihoods import LIKELIHOODS
from ..components.nets import NETWORKS
from ..components.priors import PRIORS
from ..inference.evaluators import EVALUATORS
from ..io.data import DATASETS
from ..objectives import LOSSES

__all__ = ["REGISTRIES", "add_parser", "run"]

# Each registry under the heading that names the flag choosing from it.
REGISTRIES = {
    "priors (--prior)": PRIORS,
    "likelihoods (--likelihood)": LIKELIHOODS,
    "guides (--guide)": GUIDES,
    "networks (--encoder)": NETWORKS,
    "losses (--loss)": LOSSES,
    "evaluators (pyro-vae evaluate --method)": EVALUATORS,
    "data sets (--dataset)": DATASETS,
}


def add_parser(commands: Any) -> None:
    listing = commands.add_parser(
        "list", help="every registered prior, likelihood, guide, network, loss, evaluator and data set"
    )
    listing.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for heading, registry in REGISTRIES.items():
        print(heading)
        for name, description in registry.describe().items():
            print(f"  {name:24} {description}")
    return 0

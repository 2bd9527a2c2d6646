"""Published log-likelihoods against pyro-vae's (issue 15, item 6): one row per published figure.

Every row is a ``pyro-vae train`` command and a ``pyro-vae evaluate`` command
at the paper's K, in two budgets:

- ``cpu``: what one CPU thread trains in about an hour (the epochs and
  schedule the row says), the budget of the "ours" column;
- ``gpu``: the paper's full budget (Burda et al.: 3,280 epochs under their
  schedule, ``--lr-schedule burda``), with ``--device cuda``.

The "ours" column holds only numbers measured by running the row's ``cpu``
command (machine, date and budget in ``benchmarks/README.md``, section
"Published numbers reproduced"); "not run" otherwise. A number is never
copied from one row into another.

    python benchmarks/reproduce.py --list                  # the table (markdown)
    python benchmarks/reproduce.py --dry-run [--budget gpu] [--run NAME]   # the commands, run nothing
    OMP_NUM_THREADS=1 python benchmarks/reproduce.py --run burda-dyn-vae1-k1 --data-dir ../shared/datasets

Differences from the papers that every row shares: torch's Adam with eps = 1e-8
(Burda et al. used 1e-4); torch's default initialization of the x <-> z1
networks; the decoder's output bias starts at 0 for one stochastic layer
(the command line sets it to logit(mean pixel) for the hierarchical model only).

References:
    Burda, Grosse, Salakhutdinov (2016). Importance weighted autoencoders. ICLR. (Table 1; appendix C)
    Rezende, Mohamed (2015). Variational inference with normalizing flows. ICML. (Table 2)
    Tomczak, Welling (2018). VAE with a VampPrior. AISTATS. (Table 2)
    Chadebec, Vincent, Allassonnière (2022). Pythae: unifying generative autoencoders in Python. NeurIPS
        datasets and benchmarks. (the "reproducibility" table of its README)
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["ROWS", "Row", "main"]

# Burda et al.'s networks: tanh, x <-> 200 <-> 200 <-> z1 (50, or 100 with a second layer 100 <-> 100 <-> z2 (50)).
# The decoder's output bias starts at logit(mean training pixel), as common reproductions do (and as pyro-vae
# train does by itself for several latent layers).
ONE_LAYER = (
    "--hidden-dims",
    "200,200",
    "--latent-dims",
    "50",
    "--activation",
    "tanh",
    "--output-bias",
    "mean",
)
TWO_LAYERS = (
    "--hidden-dims",
    "200,200",
    "--latent-dims",
    "100,50",
    "--layer-hidden-dims",
    "100,100",
    "--activation",
    "tanh",
    "--output-bias",
    "mean",
    # Their inference and training as written: bottom-up, no KL warm-up (pyro-vae train's defaults for
    # several layers are the ladder with warm-up).
    "--inference",
    "bottom-up",
    "--warmup-epochs",
    "0",
)
DYNAMIC = ("--dataset", "mnist", "--binarize", "dynamic")
STATIC = ("--dataset", "binarized-mnist")
# Burda et al.'s full budget: 3,280 epochs, the rate 1e-3 * 10^(-i/7) in stage i of 3^i epochs.
BURDA_BUDGET = ("--epochs", "3280", "--lr-schedule", "burda")


@dataclass(frozen=True)
class Row:
    """One published figure, the commands that reproduce it, and what we measured (None: not run)."""

    name: str
    source: str
    what: str
    published: float  # test NLL in nats, as the paper prints it
    eval_samples: int  # K of the importance-sampled log p(x) the paper reports
    flags: tuple[str, ...]  # data, model and objective: the same in both budgets
    cpu: tuple[str, ...]  # the CPU budget's training flags (epochs, schedule)
    gpu: tuple[str, ...]  # the full budget's
    ours: float | None = None
    ours_note: str = ""  # K, the test images scored, the budget actually run
    best: bool = False  # select the weights by the validation split (--eval-every, evaluate --weights best)
    notes: str = ""
    eval_flags: tuple[str, ...] = field(default=())

    def train_command(self, budget: str, *, out: str, data_dir: str) -> list[str]:
        budget_flags = self.cpu if budget == "cpu" else (*self.gpu, "--device", "cuda")
        return [
            "pyro-vae",
            "train",
            *self.flags[:2],
            "--data-dir",
            data_dir,
            *self.flags[2:],
            "--batch-size",
            "100",
            *(() if "--lr" in budget_flags else ("--lr", "1e-3")),  # a row's own rate is in its budget
            "--seed",
            "0",
            *budget_flags,
            "--eval-samples",
            "0",
            "--out",
            out,
        ]

    def evaluate_command(self, budget: str, *, out: str) -> list[str]:
        device = ["--device", "cuda"] if budget == "gpu" else []
        weights = ["--weights", "best"] if self.best else []
        return [
            "pyro-vae",
            "evaluate",
            out,
            "--num-samples",
            str(self.eval_samples),
            *weights,
            *self.eval_flags,
            *device,
            "--json",
            f"{out}/reproduce.json",
        ]


def _burda(layers: int, loss: str, k: int, published: float, **measured: object) -> Row:
    name = f"burda-dyn-{'vae' if loss == 'elbo' else 'iwae'}{layers}-k{k}"
    objective = ("--loss", loss, "--num-particles", str(k))
    # An epoch costs about k times more: the CPU budget shrinks with it (about an hour on one thread), and the
    # rate falls to 0 by a cosine over it (a constant 1e-3 for 400 epochs ended 1.8 nats worse, 89.68).
    cpu_epochs = {1: 400, 5: 100, 50: 12}[k]
    return Row(
        name=name,
        source="Burda et al. 2016, Table 1",
        what=f"dynamic MNIST, {layers} stochastic layer{'s' if layers > 1 else ''}, "
        f"{'VAE' if loss == 'elbo' else 'IWAE'} k={k}",
        published=published,
        eval_samples=5000,
        flags=(*DYNAMIC, *(ONE_LAYER if layers == 1 else TWO_LAYERS), *objective),
        cpu=("--epochs", str(cpu_epochs), "--lr-schedule", "cosine"),
        gpu=BURDA_BUDGET,
        **measured,  # type: ignore[arg-type]
    )


ROWS: tuple[Row, ...] = (
    _burda(
        1,
        "elbo",
        1,
        86.76,
        ours=87.92,
        ours_note="K=5000, all 10,000 test images, 400 epochs, cosine from 1e-3, output bias at the mean pixel, "
        "62 min of training on one shared CPU thread",
        notes="measured 2026-12-01 (goal <= 88.0: met): test ELBO -91.54, IWAE_50 -88.64; PSIS k-hat > 0.7 for "
        "87% of test images. At a constant 1e-3 with the bias at 0 the same 400 epochs gave 89.68",
    ),
    _burda(1, "elbo", 5, 86.47),
    _burda(1, "elbo", 50, 86.35),
    _burda(1, "iwae", 1, 86.76, notes="the IWAE bound with k=1 is the ELBO: the same training as VAE k=1"),
    _burda(1, "iwae", 5, 85.54),
    _burda(1, "iwae", 50, 84.78),
    _burda(2, "elbo", 1, 85.33),
    _burda(2, "elbo", 5, 85.01),
    _burda(2, "elbo", 50, 84.78),
    _burda(2, "iwae", 1, 85.33, notes="the IWAE bound with k=1 is the ELBO: the same training as VAE k=1"),
    _burda(2, "iwae", 5, 83.89),
    _burda(2, "iwae", 50, 82.90),
    Row(
        name="static-vae",
        source="Rezende & Mohamed 2015, Table 2 (89.9); pythae's reproduction 89.78",
        what="static MNIST (Larochelle & Murray's split), VAE, diagonal Gaussian guide",
        published=89.9,
        eval_samples=5000,
        flags=(*STATIC, *ONE_LAYER, "--loss", "elbo"),
        cpu=("--epochs", "300", "--lr-schedule", "cosine", "--eval-every", "10", "--valid-samples", "100"),
        gpu=(*BURDA_BUDGET, "--eval-every", "10", "--valid-samples", "100"),
        best=True,
        ours=89.87,
        ours_note="K=5000, all 10,000 test images, best.pt by IWAE_100 on the valid file (epoch 300 of 300), cosine "
        "from 1e-3, output bias at the mean pixel, 59 min of training on one shared CPU thread",
        notes="Burda et al.'s one-layer network (not the paper's DLGM); measured 2026-12-01 (goal within 0.5 of "
        "89.9: met). At a constant 1e-3, the bias at 0 and the best epoch by the validation ELBO it gave 91.86",
    ),
    Row(
        name="static-iwae-k50",
        source="Burda et al. 2016, appendix C (87.10); pythae's reproduction 86.82",
        what="static MNIST, IWAE k=50, one stochastic layer",
        published=87.10,
        eval_samples=5000,
        flags=(*STATIC, *ONE_LAYER, "--loss", "iwae", "--num-particles", "50"),
        cpu=("--epochs", "12", "--lr-schedule", "cosine", "--eval-every", "2", "--valid-samples", "100"),
        gpu=(*BURDA_BUDGET, "--eval-every", "10"),
        best=True,
    ),
    Row(
        name="vampprior",
        source="Tomczak & Welling 2018, Table 2",
        what="static MNIST, VAE with the VampPrior (500 pseudo-inputs), x <-> 300 <-> 300 <-> z (40)",
        published=85.57,
        eval_samples=5000,
        flags=(
            *STATIC,
            "--prior",
            "vamp",
            "--prior-components",
            "500",
            "--hidden-dims",
            "300,300",
            "--latent-dims",
            "40",
            "--loss",
            "elbo",
        ),
        cpu=("--epochs", "200", "--lr", "5e-4", "--warmup-epochs", "100", "--eval-every", "5"),
        gpu=("--epochs", "2000", "--lr", "5e-4", "--warmup-epochs", "100", "--eval-every", "5"),
        best=True,
        notes="the paper's gated dense layers are plain MLP layers here; early stopping by best.pt",
    ),
)


def _markdown(rows: Sequence[Row]) -> str:
    lines = [
        "| row | published figure | published NLL | ours (NLL) | K | CPU budget | source | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours = "not run" if row.ours is None else f"{row.ours:.2f} ({row.ours_note})"
        lines.append(
            f"| `{row.name}` | {row.what} | {row.published:.2f} | {ours} | {row.eval_samples} | "
            f"{' '.join(row.cpu)} | {row.source} | {row.notes} |"
        )
    return "\n".join(lines)


def _out(row: Row, budget: str, root: str) -> str:
    return f"{root}/{row.name}-{budget}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the table of rows (markdown)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the rows, run nothing")
    parser.add_argument("--run", default=None, metavar="NAME", help="train and evaluate the row NAME")
    parser.add_argument("--budget", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--data-dir", default="../shared/datasets")
    parser.add_argument("--out-root", default="runs/reproduce", help="run folders go to OUT_ROOT/NAME-BUDGET")
    args = parser.parse_args(argv)
    names = {row.name: row for row in ROWS}
    if args.run is not None and args.run not in names:
        parser.error(f"unknown row {args.run!r}; the rows are: {', '.join(names)}")
    if args.list or not (args.dry_run or args.run):
        print(_markdown(ROWS))
        return 0
    rows = [names[args.run]] if args.run else list(ROWS)
    for row in rows:
        out = _out(row, args.budget, args.out_root)
        commands = [
            row.train_command(args.budget, out=out, data_dir=args.data_dir),
            row.evaluate_command(args.budget, out=out),
        ]
        for command in commands:
            print(shlex.join(command))
            if args.dry_run:
                continue
            # The installed entry point of the interpreter running this script.
            status = subprocess.call([sys.executable, "-m", "pyro_vae", *command[1:]])
            if status:
                return status
    return 0


if __name__ == "__main__":
    sys.exit(main())

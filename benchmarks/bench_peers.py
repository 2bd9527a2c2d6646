"""pyro_vae against its peers: Pyro's own VAE example and pythae, timed side by side in one process.

Each peer is timed against pyro_vae at the same shapes, interleaved (a round
of one, then a round of the other, so that drift in the machine's speed hits
both alike), after warm-up, on the CPU:

1. ``pyro-example``: the training step of Pyro's ``examples/vae/vae_comparison.py
   --impl pyro`` (its ``PyroVAEImpl``: a 784-400-20 MLP VAE with ReLU
   layers, Bernoulli probabilities from a sigmoid, Pyro's ``SVI`` with
   ``Trace_ELBO`` and per-parameter ``pyro.optim.Adam`` lr 1e-3, batch 128;
   with ``--jit``, ``JitTrace_ELBO``) against pyro_vae's step at 784-400-20,
   batch 128 (``fit``'s AsyncSVI, Trace_ELBO and fused Adam; with ``--jit``,
   ``JitELBO``). That file is not in the pyro-ppl wheel: pass a checkout of
   Pyro's ``examples/vae`` as ``--pyro-examples DIR`` (by default it is looked
   for beside this repository, ``../pyro/examples/vae``, and in a source
   checkout of the installed pyro). Its classes are imported from the file,
   nothing of it is copied here. It builds its prior on the CPU, so this runs
   on the CPU. Pyro's validation is off for both sides, as in bench_train.py. Rows in ms/step; ``ratio_pyro_example`` is pyro_vae's default
   over the example's ``Trace_ELBO`` step, ``ratio_pyro_example_jit``
   pyro_vae ``--jit`` over the example's ``--jit`` step (below 1: pyro_vae is
   faster).
2. ``pythae``: pythae's ``VAE`` with a 784-400-50 MLP of its own kind (ReLU
   layers, a sigmoid output, ``reconstruction_loss="bce"``: pythae's default
   MLP with the hidden width set to 400) trained by its ``BaseTrainer``
   (Adam lr 1e-3, batch 128) against pyro_vae's ``fit`` of the 784-400-50
   default VAE (softplus layers, Bernoulli logits) on the same data, one epoch
   each per round: s/epoch, pythae's ``train_step`` (one pass over its
   DataLoader) against fit's own epoch clock (``EpochRecord.seconds``), both
   without setup; ``ratio_pythae_epoch`` is ours over theirs (below 1: pyro_vae
   is faster). Then importance-sampled log p(x) at K samples per datum
   (default 500): pythae's ``get_nll(x, n_samples=K, batch_size=100)`` (its
   API and default batch) under ``torch.no_grad()`` against
   ``pyro_vae.log_marginal(..., num_samples=K)``: data points per second;
   ``ratio_pythae_nll`` is ours over theirs (above 1: pyro_vae is faster).

A peer that cannot be imported is skipped with one line, ``skipped
pyro-example: ...`` or ``skipped pythae: ...``, and the rest goes on; this
script installs nothing. Data: MNIST from ``--data-dir`` (default
``../shared/datasets``), binarized once, when it is there; random binary
784-pixel data otherwise (and always with ``--quick``). Prints one table at
the end (each peer's figure, pyro_vae's and the ratio) and one line
``ratio_<peer>=<float>`` per ratio measured. No GPU is used.

To measure pythae without touching this project's environment, install it
and the dependencies the venv lacks (no torch, numpy, scipy or scikit-learn:
the venv's are used) into a folder of their own, without their dependencies,
and put that folder on PYTHONPATH; for Pyro's example, a checkout of Pyro's
repository (the file was read at pyro-ppl/pyro commit ff6ae1c, October 2024)::

    .venv/bin/pip install --no-deps --target /tmp/peers/site pythae==0.1.2 imageio==2.38.2 \\
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    PYTHONPATH=/tmp/peers/site OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_peers.py \\
        --pyro-examples /tmp/peers/pyro/examples/vae

(pydantic-core must be the version that pydantic pins.)

    python benchmarks/bench_peers.py --quick   # seconds, tiny sizes: what the test suite runs
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pyro
import torch

from pyro_vae import ModelConfig, build_vae, fit, load_dataset, log_marginal, make_loss
from pyro_vae.training.loop import AsyncSVI
from pyro_vae.training.optim import JointAdam

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_FILE = "vae_comparison.py"


@dataclass
class Row:
    """One peer figure against pyro_vae's: ``ratio`` is ours / theirs."""

    peer: str
    unit: str
    theirs: float
    ours: float
    key: str  # the name of its ratio line

    @property
    def ratio(self) -> float:
        return self.ours / self.theirs


def skipped(peer: str, why: str) -> None:
    print(f"skipped {peer}: {why}", flush=True)


def timed(fn: Callable[[], object]) -> float:
    """Seconds that ``fn()`` takes (everything here runs on the CPU: no device to synchronize)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- data ----


def load_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Binary [N, 784] train and test tensors: MNIST binarized once when present, random pixels otherwise."""
    generator = torch.Generator().manual_seed(0)
    if not args.quick and (Path(args.data_dir) / "MNIST").is_dir():
        mnist = load_dataset("mnist", data_dir=args.data_dir, download=False)
        train = torch.bernoulli(mnist.train, generator=generator)
        test = torch.bernoulli(mnist.test, generator=generator)
        return train, test, f"MNIST from {args.data_dir}, binarized once"
    n_train, n_test = (512, 64) if args.quick else (60_000, 10_000)
    train = torch.bernoulli(torch.full((n_train, 784), 0.13), generator=generator)
    test = torch.bernoulli(torch.full((n_test, 784), 0.13), generator=generator)
    return train, test, "random binary pixels (p = 0.13)"


# ---- Pyro's examples/vae/vae_comparison.py ----


def find_pyro_examples(given: str | None) -> Path | None:
    """The folder holding Pyro's ``vae_comparison.py``: ``given``, or the first default that has it."""
    if given is not None:
        candidates = [Path(given), Path(given) / "examples" / "vae"]
    else:
        candidates = [
            REPO.parent / "pyro" / "examples" / "vae",
            Path(pyro.__file__).resolve().parents[1] / "examples" / "vae",
        ]
    return next((folder for folder in candidates if (folder / EXAMPLE_FILE).is_file()), None)


def import_example(folder: Path) -> ModuleType:
    """Import ``folder/vae_comparison.py`` as a module; its own ``utils`` package is imported from ``folder``."""
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location("pyro_vae_comparison", folder / EXAMPLE_FILE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def pyro_example_rows(args: argparse.Namespace, train: torch.Tensor) -> list[Row]:
    folder = find_pyro_examples(args.pyro_examples)
    if folder is None:
        where = (
            args.pyro_examples or f"{REPO.parent / 'pyro' / 'examples' / 'vae'} nor beside the installed pyro"
        )
        skipped(
            "pyro-example",
            f"no {EXAMPLE_FILE} in {where} (pass --pyro-examples DIR, a checkout of pyro's examples/vae)",
        )
        return []
    try:
        example = import_example(folder)
    except Exception as error:  # any failure of a peer's import: a skip, said in one line
        skipped("pyro-example", f"cannot import {folder / EXAMPLE_FILE} ({type(error).__name__}: {error})")
        return []
    batch = 128
    x = train[:batch]
    store = pyro.get_param_store()
    steps: dict[str, Callable[[], object]] = {}
    for jit in (False, True):
        # Each implementation keeps its parameters in a param store of its own, entered around its steps.
        with store.scope() as state:
            pyro.set_rng_seed(0)
            impl = example.PyroVAEImpl(SimpleNamespace(jit=jit, batch_size=batch, rng_seed=0), None, None)
        steps[f"example{' --jit' if jit else ''}"] = _in_scope(
            store, state, lambda impl=impl: impl.compute_loss_and_gradient(x)
        )
    for jit in (False, True):
        pyro.set_rng_seed(0)
        vae = build_vae(ModelConfig(data_dim=784, latent_dims=(20,), hidden_dims=(400,)))
        with store.scope() as state:
            svi = AsyncSVI(vae.model, vae.guide, JointAdam(lr=1e-3), loss=make_loss("elbo", jit=jit))
        steps[f"ours{' --jit' if jit else ''}"] = _in_scope(
            store, state, lambda svi=svi: svi.step_async(x, num_data=train.shape[0])
        )
    times = interleave(steps, warmup=args.warmup, rounds=args.rounds, per_round=args.steps_per_round)
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    return [
        Row("pyro example (Trace_ELBO)", "ms/step", ms["example"], ms["ours"], "ratio_pyro_example"),
        Row(
            "pyro example --jit, ours --jit",
            "ms/step",
            ms["example --jit"],
            ms["ours --jit"],
            "ratio_pyro_example_jit",
        ),
    ]


def _in_scope(store, state, step: Callable[[], object]) -> Callable[[], object]:  # type: ignore[no-untyped-def]
    def run() -> object:
        with store.scope(state):
            return step()

    return run


def interleave(
    steps: dict[str, Callable[[], object]], *, warmup: int, rounds: int, per_round: int
) -> dict[str, list[float]]:
    """Seconds of every call of each step: ``warmup`` calls of each, then ``rounds`` rounds of ``per_round``."""
    with pyro.validation_enabled(False):
        for _ in range(warmup):
            for step in steps.values():
                step()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                times[name] += [timed(step) for _ in range(per_round)]
    return times


# ---- pythae ----


def import_pythae() -> SimpleNamespace | None:
    """pythae's classes used here, or None after a ``skipped pythae`` line."""
    try:
        from pythae.data.datasets import BaseDataset
        from pythae.models import VAE, VAEConfig
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
        from pythae.trainers import BaseTrainer, BaseTrainerConfig
    except ImportError as error:
        if error.name == "pythae":
            skipped("pythae", "not installed (pip install pythae)")
        else:
            skipped("pythae", f"cannot import it ({type(error).__name__}: {error})")
        return None
    except Exception as error:  # any failure of a peer's import: a skip, said in one line
        skipped("pythae", f"cannot import it ({type(error).__name__}: {error})")
        return None
    return SimpleNamespace(
        BaseDataset=BaseDataset,
        VAE=VAE,
        VAEConfig=VAEConfig,
        ModelOutput=ModelOutput,
        BaseEncoder=BaseEncoder,
        BaseDecoder=BaseDecoder,
        BaseTrainer=BaseTrainer,
        BaseTrainerConfig=BaseTrainerConfig,
    )


def pythae_vae(api: SimpleNamespace, hidden: int, latent: int):  # type: ignore[no-untyped-def]
    """pythae's VAE with its default MLP's layer kinds at 784-``hidden``-``latent``."""

    class Encoder(api.BaseEncoder):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.Sequential(torch.nn.Linear(784, hidden), torch.nn.ReLU())
            self.embedding = torch.nn.Linear(hidden, latent)
            self.log_var = torch.nn.Linear(hidden, latent)

        def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
            h = self.hidden(x.reshape(-1, 784))  # [B, hidden]
            return api.ModelOutput(embedding=self.embedding(h), log_covariance=self.log_var(h))

    class Decoder(api.BaseDecoder):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(latent, hidden),
                torch.nn.ReLU(),
                torch.nn.Linear(hidden, 784),
                torch.nn.Sigmoid(),
            )

        def forward(self, z: torch.Tensor):  # type: ignore[no-untyped-def]
            return api.ModelOutput(reconstruction=self.layers(z))  # [B, 784] Bernoulli means

    config = api.VAEConfig(input_dim=(784,), latent_dim=latent, reconstruction_loss="bce")
    return api.VAE(model_config=config, encoder=Encoder(), decoder=Decoder())


def pythae_rows(args: argparse.Namespace, train: torch.Tensor, test: torch.Tensor) -> list[Row]:
    api = import_pythae()
    if api is None:
        return []
    # Its loggers (one per module, each at INFO) would bury the table in per-epoch lines.
    for name in [name for name in logging.root.manager.loggerDict if name.split(".")[0] == "pythae"]:
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.manual_seed(0)
    theirs = pythae_vae(api, hidden=400, latent=50)
    pyro.set_rng_seed(0)
    ours = build_vae(ModelConfig(data_dim=784, latent_dims=(50,), hidden_dims=(400,)))
    epochs = 1 + args.epoch_rounds  # the first of each is warm-up
    with tempfile.TemporaryDirectory() as output_dir:
        config = api.BaseTrainerConfig(
            output_dir=output_dir,
            num_epochs=epochs,
            per_device_train_batch_size=128,
            per_device_eval_batch_size=128,
            learning_rate=1e-3,
            no_cuda=True,
        )
        dataset = api.BaseDataset(train, torch.zeros(train.shape[0]))
        trainer = api.BaseTrainer(model=theirs, train_dataset=dataset, training_config=config)
        trainer.prepare_training()
        their_epochs, our_epochs = [], []
        for epoch in range(1, epochs + 1):
            with contextlib.redirect_stdout(sys.stderr):  # its console printer: keep stdout for the table
                their_epochs.append(timed(lambda epoch=epoch: trainer.train_step(epoch)))
            result = fit(
                ours, train, epochs=1, batch_size=128, lr=1e-3, seed=epoch, device="cpu", progress=False
            )
            our_epochs.append(result.history[-1].seconds)
    theirs.eval()
    rows = [
        Row(
            "pythae trainer epoch",
            "s/epoch",
            statistics.median(their_epochs[1:]),
            statistics.median(our_epochs[1:]),
            "ratio_pythae_epoch",
        )
    ]
    # log p(x) at K samples per datum, one slice of the test data per round after a warm-up slice.
    slices = torch.arange(args.nll_points * (1 + args.rounds)).remainder(test.shape[0]).chunk(1 + args.rounds)
    their_seconds = our_seconds = 0.0
    for i, index in enumerate(slices):
        x = test[index]  # [points, 784]
        with torch.no_grad():
            their = timed(lambda x=x: theirs.get_nll(x, n_samples=args.num_samples, batch_size=100))
        mine = timed(lambda x=x: log_marginal(ours.model, ours.guide, x, num_samples=args.num_samples))
        if i > 0:
            their_seconds, our_seconds = their_seconds + their, our_seconds + mine
    points = args.nll_points * args.rounds
    # Throughputs: the ratio ours / theirs is then above 1 when pyro_vae is faster.
    rows.append(
        Row(
            f"pythae get_nll K={args.num_samples}",
            "points/s",
            points / their_seconds,
            points / our_seconds,
            "ratio_pythae_nll",
        )
    )
    return rows


# ---- main ----


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pyro-examples",
        metavar="DIR",
        help="a checkout of pyro's examples/vae (or of pyro) holding vae_comparison.py; "
        "default: ../pyro/examples/vae or beside the installed pyro",
    )
    parser.add_argument(
        "--peers", default="pyro-example,pythae", help="comma-separated: pyro-example, pythae"
    )
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "datasets"))
    parser.add_argument("--warmup", type=int, default=20, help="warm-up steps of each (pyro-example)")
    parser.add_argument(
        "--rounds", type=int, default=10, help="interleaved rounds (pyro-example steps, get_nll)"
    )
    parser.add_argument("--steps-per-round", type=int, default=20)
    parser.add_argument(
        "--epoch-rounds", type=int, default=3, help="timed epochs of each, after one warm-up epoch"
    )
    parser.add_argument("--nll-points", type=int, default=100, help="test points per get_nll round")
    parser.add_argument("--num-samples", type=int, default=500, help="K, importance samples per datum")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes on random data: seconds (the test suite)"
    )
    args = parser.parse_args(argv)
    peers = {name.strip() for name in args.peers.split(",") if name.strip()}
    unknown = peers - {"pyro-example", "pythae"}
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(sorted(unknown))}; choose from pyro-example, pythae")
    if args.quick:
        args.warmup, args.rounds, args.steps_per_round, args.epoch_rounds, args.nll_points = 2, 2, 2, 1, 2
    torch.manual_seed(0)
    train, test, source = load_data(args)
    print(
        f"cpu, torch {torch.__version__}, pyro {pyro.__version__}, threads {torch.get_num_threads()}; "
        f"data: {source}, {train.shape[0]} train / {test.shape[0]} test",
        flush=True,
    )
    rows: list[Row] = []
    if "pyro-example" in peers:
        rows += pyro_example_rows(args, train)
    else:
        skipped("pyro-example", "not asked for (--peers)")
    if "pythae" in peers:
        rows += pythae_rows(args, train, test)
    else:
        skipped("pythae", "not asked for (--peers)")
    if not rows:
        print("no peer measured")
        return 0
    width = max(len(row.peer) for row in rows)
    print(f"{'peer':<{width}}  {'unit':<8} {'peer':>10} {'pyro_vae':>10} {'ratio':>7}")
    for row in rows:
        print(f"{row.peer:<{width}}  {row.unit:<8} {row.theirs:>10.4g} {row.ours:>10.4g} {row.ratio:>7.3f}")
    for row in rows:
        print(f"{row.key}={row.ratio:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

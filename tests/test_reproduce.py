"""benchmarks/reproduce.py (issue 15, item 6): its table lists every published figure, and every command it
prints is one that pyro-vae accepts (nothing is trained here)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from pyro_vae import TrainConfig
from pyro_vae.cli.main import parser
from pyro_vae.cli.options import dataclass_from_args
from pyro_vae.cli.train import fill_several_layer_defaults

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"

# The published figures the issue names: (row, NLL).
PUBLISHED = {
    "burda-dyn-vae1-k1": 86.76,
    "burda-dyn-vae1-k5": 86.47,
    "burda-dyn-vae1-k50": 86.35,
    "burda-dyn-iwae1-k5": 85.54,
    "burda-dyn-iwae1-k50": 84.78,
    "burda-dyn-vae2-k1": 85.33,
    "burda-dyn-iwae2-k50": 82.90,
    "static-vae": 89.90,
    "static-iwae-k50": 87.10,
    "vampprior": 85.57,
}


def _script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=120)


def test_list_prints_a_row_per_published_figure():
    done = _script("--list")
    assert done.returncode == 0, done.stderr
    rows = {
        cells[1].strip("` "): cells
        for line in done.stdout.splitlines()
        if (cells := [c.strip() for c in line.split("|")])[1].startswith("`")
    }
    for name, nll in PUBLISHED.items():
        assert rows[name][3] == f"{nll:.2f}", name
        assert rows[name][5] == "5000"  # K of the published evaluations
    assert len(rows) == 15  # Table 1's 12 (1 and 2 layers, VAE and IWAE, k = 1, 5, 50) and 3 on static MNIST


def test_every_dry_run_command_is_one_pyro_vae_accepts():
    for budget in ("cpu", "gpu"):
        done = _script("--dry-run", "--budget", budget)
        assert done.returncode == 0, done.stderr
        commands = [shlex.split(line) for line in done.stdout.splitlines()]
        assert len(commands) == 2 * 15  # a train and an evaluate command per row
        for command in commands:
            assert command[0] == "pyro-vae"
            args = parser().parse_args(command[1:])
            if args.command == "train":
                fill_several_layer_defaults(args)  # as pyro-vae train does before it builds TrainConfig
                config = dataclass_from_args(TrainConfig, args)  # the options TrainConfig accepts
                assert ("--device" in command) == (budget == "gpu")
                if budget == "gpu" and "burda" in command[-1]:
                    assert config.lr_schedule == "burda" and config.epochs == 3280
            else:
                assert args.num_samples == 5000


def test_an_unknown_row_is_refused():
    done = _script("--dry-run", "--run", "no-such-row")
    assert done.returncode == 2 and "unknown row 'no-such-row'" in done.stderr

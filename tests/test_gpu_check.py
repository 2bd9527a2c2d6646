"""benchmarks/gpu_check.py: its dry run exercises every step of the GPU check on the CPU, and --wheels leaves a
complete environment alone."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
STEPS = ("install", "cuda-tests", "bench-train", "bench-eval", "train", "train-torchrun", "ais")


def _gpu_check(cwd: Path, *argv: str) -> tuple[subprocess.CompletedProcess, dict[str, list[str]]]:
    """Run the script in ``cwd``; its table as {step: [command, seconds, figure, status]}."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", "table.md", "--work-dir", "work", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (cwd / "table.md").exists(), done.stdout + done.stderr
    rows = [line.strip("|").split(" | ") for line in (cwd / "table.md").read_text().splitlines()]
    table = {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows if len(cells) == 5}
    return done, table


def test_dry_run_runs_every_step_and_none_fails(tmp_path):
    done, table = _gpu_check(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [name for name in table if name != "step"] == list(STEPS)
    assert table["install"][3] == "skipped"  # no --wheels
    for name in STEPS[1:]:
        assert table[name][3] == "ok", (name, table[name])
    # The figures the table exists for, read from each step's output.
    assert table["bench-train"][2].startswith("ratio=")
    assert "matmul_fraction=" in table["bench-eval"][2] and table["bench-eval"][2].startswith("evaluation ")
    assert table["train"][2].endswith(" s/epoch") and table["train-torchrun"][2].endswith(" s/epoch")
    assert table["ais"][2].startswith("log p(x) = ")
    assert "skipped" in table["cuda-tests"][2] or "passed" in table["cuda-tests"][2]
    assert (tmp_path / "work" / "ais.log").exists()


def test_wheels_with_everything_importable_installs_nothing(tmp_path):
    for name in ("pyro_vae", "pyro-ppl", "arviz"):
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{name} is not installed here, so the install step would have work to do")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    done, table = _gpu_check(tmp_path, "--wheels", str(wheels), "--steps", "install")
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(table) == ["step", "install"]
    command, _seconds, figure, status = table["install"]
    assert status == "skipped" and figure.startswith("skipped: nothing to install"), figure
    assert str(wheels) in command and "--no-index" in command
    assert list(wheels.iterdir()) == []

"""The GPU check: every GPU figure of the project from one command, in one table, within 8 minutes.

On a machine with a CUDA GPU (Python 3.12 and torch, perhaps no pyro-ppl, no
arviz and no internet) this runs, each step in a subprocess with its own
timeout and all of them within an 8-minute budget; a step that fails is
recorded and the next one runs:

1. ``install``: with ``--wheels DIR``, when pyro_vae, pyro-ppl or arviz is not
   importable, ``pip install --no-index --find-links DIR --no-build-isolation
   -e <checkout>``: the package from this checkout, its missing dependencies
   from the wheels in DIR, offline.
2. ``cuda-tests``: the tests that need a CUDA device (``pytest -k cuda``:
   those under ``requires_cuda`` or ``pytest.mark.cuda``).
3. ``bench-train``: ``benchmarks/bench_train.py --device cuda`` at batch 128
   and 1024: the default step over the hand-written PyTorch VAE (``ratio=``,
   and ``ratio_fused=`` against the hand-written VAE with ``Adam(fused=True)``;
   the goal is <= 1.0 at both batch sizes).
4. ``bench-eval``: ``benchmarks/bench_eval.py --device cuda`` over the 10,000
   MNIST test images at K=5000 (goal: under 30 s on an H100-class GPU), with
   its fraction of the decoder's plain matmul rate.
5. ``train`` and ``train-torchrun``: one MNIST epoch of ``pyro-vae train
   --device cuda``, and the same as one process of ``torchrun --distributed``
   (NCCL): seconds per epoch.
6. ``ais``: ``pyro-vae evaluate RUN --method ais --limit 1000`` on the run of
   step 5: log p(x) and its wall time.

It prints one markdown table (step, command, seconds, figure, status), also
written to ``--out``; each step's whole output goes to ``WORK/<step>.log``,
and a failed step's last lines to stderr. The steps on MNIST need
``--data-dir`` (torchvision's layout, ``DIR/MNIST/raw``) and are skipped with
a line without it. ``--dry-run`` runs the same chain on the CPU at tiny sizes
(the embedded digits, tiny networks, small K, ``--limit 20``, torchrun with
gloo) in a minute or two; the test suite runs it.

Preparing DIR, on a machine with internet (the wheels are pure Python; torch,
numpy, scipy, xarray, h5py, matplotlib, scikit-learn and tqdm are on the GPU
machine already, so they are left out)::

    pip download -d DIR --no-deps --only-binary=:all: --python-version 3.12 \\
        pyro-ppl pyro-api arviz arviz-base arviz-stats arviz-plots xarray-einstats h5netcdf

pip names any dependency still missing there; download it the same way.

    python benchmarks/gpu_check.py --wheels DIR --data-dir DATASETS --out gpu_check.md
    python benchmarks/gpu_check.py --dry-run --out gpu_check.md
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
BUDGET_S = 8 * 60
# Modules whose absence on the GPU machine sends the install step to pip.
NEEDED_MODULES = ("pyro_vae", "pyro", "arviz")


@dataclass(frozen=True)
class Step:
    """One measured command: ``parse`` turns its output into the figure, or None when it has none."""

    name: str
    argv: tuple[str, ...]
    timeout_s: float
    parse: Callable[[str], str | None]
    skip: str | None = None  # why the step does not run, written in the table instead of a figure
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    step: Step
    seconds: float
    figure: str
    status: str  # ok, failed or skipped


# ---- parsers: the figure each step measures, read from its output ----


def key_values(output: str) -> str | None:
    """The ``key=value`` lines a benchmark ends with (``ratio=1.02``), joined."""
    pairs = re.findall(r"^([A-Za-z_]\w*)=(\S+)\s*$", output, flags=re.MULTILINE)
    return ", ".join(f"{key}={value}" for key, value in pairs) or None


def column(output: str, name: str) -> str | None:
    """The value under the header ``name`` in the table row after the first header that has it.

    Counted from the right: a header's first column may be two words (``data points``), its values one.
    """
    lines = output.splitlines()
    for header, row in itertools.pairwise(lines):
        names, values = header.split(), row.split()
        if name in names and len(values) >= len(names) - names.index(name):
            return values[names.index(name) - len(names)]
    return None


def eval_figures(output: str) -> str | None:
    figures = key_values(output)
    seconds = column(output, "seconds")
    if figures is None or seconds is None:
        return None
    return f"evaluation {seconds} s; {figures}"


def pytest_summary(output: str) -> str | None:
    """pytest's last line (``4 passed in 3.1s``); None when no test was selected."""
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?)\s*=*$", output, flags=re.MULTILINE)
    return found[-1] if found else None


def seconds_per_epoch(output: str) -> str | None:
    found = re.search(r"\(([\d.]+) s/epoch\)", output)
    return f"{found.group(1)} s/epoch" if found else None


def ais_log_px(output: str) -> str | None:
    found = re.search(r"^log p\(x\) \(AIS\)\s+(\S+)\s+± (\S+)", output, flags=re.MULTILINE)
    return f"log p(x) = {found.group(1)} ± {found.group(2)}" if found else None


def pip_installed(output: str) -> str | None:
    found = re.search(r"^Successfully installed (.+)$", output, flags=re.MULTILINE)
    return f"installed {found.group(1)}" if found else "nothing new to install"


# ---- the plan ----


def missing_modules() -> list[str]:
    # This script runs from benchmarks/, so the checkout's pyro_vae is found only once it is installed.
    return [name for name in NEEDED_MODULES if importlib.util.find_spec(name) is None]


def mnist_missing(data_dir: Path | None) -> str | None:
    """Why the MNIST steps cannot run (None when they can)."""
    if data_dir is None:
        return "skipped: no --data-dir (the MNIST files, torchvision's layout)"
    if not (data_dir / "MNIST" / "raw").is_dir():
        return f"skipped: no MNIST/raw in --data-dir {data_dir}"
    return None


def plan(args: argparse.Namespace, work: Path) -> list[Step]:
    """The steps in order; the dry run is the same chain on the CPU at tiny sizes."""
    python = sys.executable
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    # The dry run shares two cores with everything else: one thread each, or parallel regions stall.
    env = {"OMP_NUM_THREADS": "1"} if dry else {}

    # The steps run in the checkout: paths the caller gave relative to its own folder are resolved here.
    wheels = Path(args.wheels).resolve() if args.wheels else "DIR"
    data_dir = Path(args.data_dir).resolve() if args.data_dir else None
    missing = missing_modules()
    install_skip = None
    if args.wheels is None:
        install_skip = "skipped: no --wheels given"
    elif not missing:
        install_skip = f"skipped: nothing to install ({', '.join(NEEDED_MODULES)} importable)"
    install = Step(
        "install",
        (python, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
         "--no-build-isolation", "-e", str(REPO)),
        60,
        pip_installed,
        skip=install_skip,
    )  # fmt: skip

    # On the CPU the selected tests skip themselves: the dry run still proves that -k cuda selects some.
    cuda_tests = Step(
        "cuda-tests",
        (python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", str(REPO / "tests")),
        90,
        pytest_summary,
        env=env,
    )

    bench_train = Step(
        "bench-train",
        (python, str(BENCHMARKS / "bench_train.py"), "--device", device,
         *(("--smoke-test",) if dry else ("--batch-sizes", "128", "1024"))),
        90,
        key_values,
        env=env,
    )  # fmt: skip

    if dry:
        data, data_skip = ("--dataset", "digits"), None
        eval_sizes = ("--limit", "20", "--num-samples", "50", "--chunk-size", "50", "--rounds", "2")
        net = ("--hidden-dims", "16", "--latent-dims", "2")
        ais_sizes = ("--limit", "20", "--num-chains", "2", "--num-steps", "10", "--pilot-chains", "2")
    else:
        data_skip = mnist_missing(data_dir)
        data = ("--dataset", "mnist", "--data-dir", str(data_dir))
        eval_sizes = ("--limit", "10000", "--num-samples", "5000")
        net = ()
        ais_sizes = ("--limit", "1000")
    eval_data = () if dry else ("--data-dir", str(data_dir))
    bench_eval = Step(
        "bench-eval",
        (python, str(BENCHMARKS / "bench_eval.py"), "--device", device, *eval_data, *eval_sizes),
        120,
        eval_figures,
        skip=data_skip,
        env=env,
    )

    run = work / "run-train"
    train_args = ("train", *data, *net, "--device", device, "--epochs", "1", "--eval-samples", "0")
    train = Step(
        "train",
        (python, "-m", "pyro_vae", *train_args, "--out", str(run), "--overwrite"),
        45,
        seconds_per_epoch,
        skip=data_skip,
        env=env,
    )
    # torch.distributed.run is torchrun; one process: NCCL on the GPU, gloo in the dry run.
    torchrun = Step(
        "train-torchrun",
        (python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
         "-m", "pyro_vae", *train_args, "--distributed", "--out", str(work / "run-torchrun"), "--overwrite"),
        45,
        seconds_per_epoch,
        skip=data_skip,
        env=env,
    )  # fmt: skip
    ais = Step(
        "ais",
        (python, "-m", "pyro_vae", "evaluate", str(run), "--method", "ais", "--device", device, *ais_sizes),
        90,
        ais_log_px,
        skip=data_skip,
        env=env,
    )
    steps = [install, cuda_tests, bench_train, bench_eval, train, torchrun, ais]
    if args.steps:
        unknown = set(args.steps) - {step.name for step in steps}
        if unknown:
            raise SystemExit(f"unknown --steps {', '.join(sorted(unknown))}; choose from {STEP_NAMES}")
        steps = [step for step in steps if step.name in args.steps]
    return steps


STEP_NAMES = "install, cuda-tests, bench-train, bench-eval, train, train-torchrun, ais"


# ---- the runner and the table ----


def run_step(step: Step, *, seconds_left: float, work: Path) -> Result:
    """Run one step in a subprocess (cwd: the checkout) within its timeout and what is left of the budget."""
    if step.skip is not None:
        return Result(step, 0.0, step.skip, "skipped")
    timeout = min(step.timeout_s, seconds_left)
    if timeout < 5:
        return Result(step, 0.0, f"not run: {seconds_left:.0f} s left of the {BUDGET_S} s budget", "failed")
    start = time.perf_counter()
    try:
        done = subprocess.run(
            step.argv,
            cwd=REPO,
            env={**os.environ, **step.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        output, code = done.stdout, done.returncode
    except subprocess.TimeoutExpired as stopped:
        output = stopped.stdout if isinstance(stopped.stdout, str) else (stopped.stdout or b"").decode()
        code = None
    seconds = time.perf_counter() - start
    (work / f"{step.name}.log").write_text(output)
    figure = step.parse(output)
    if code is None:
        figure, status = f"timed out after {timeout:.0f} s", "failed"
    elif code != 0:
        figure, status = f"exit status {code}", "failed"
    elif figure is None:
        figure, status = "no figure in its output", "failed"
    else:
        status = "ok"
    if status == "failed":
        tail = "\n".join(output.splitlines()[-15:])
        print(f"--- {step.name} failed ({figure}); the end of its output:\n{tail}", file=sys.stderr)
    return Result(step, seconds, figure, status)


def display(argv: Sequence[str]) -> str:
    """The command as a reader would type it: ``python`` for this interpreter, paths relative to the checkout."""
    words = ["python" if word == sys.executable else word.replace(f"{REPO}{os.sep}", "") for word in argv]
    words = ["." if word == str(REPO) else word for word in words]
    return shlex.join(words)


def table(results: Sequence[Result], *, title: str) -> str:
    rows = [
        f"| {r.step.name} | `{display(r.step.argv)}` | {r.seconds:.1f} | {r.figure} | {r.status} |"
        for r in results
    ]
    return "\n".join(
        [title, "", "| step | command | seconds | figure | status |", "|---|---|---|---|---|", *rows]
    )


def main(args: argparse.Namespace) -> int:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps = plan(args, work)
    deadline = time.perf_counter() + BUDGET_S
    results = []
    for number, step in enumerate(steps, start=1):
        print(f"[{number}/{len(steps)}] {step.name}", file=sys.stderr, flush=True)
        result = run_step(step, seconds_left=deadline - time.perf_counter(), work=work)
        print(f"[{number}/{len(steps)}] {step.name}: {result.status}, {result.figure}", file=sys.stderr)
        results.append(result)
    mode = "dry run on the CPU, tiny sizes" if args.dry_run else "CUDA"
    text = table(results, title=f"GPU check ({mode}); logs in {work}")
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--wheels", type=Path, default=None, help="folder of wheels to install missing packages from, offline"
    )
    parser.add_argument("--data-dir", default=None, help="folder with MNIST/raw (torchvision's layout)")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    parser.add_argument(
        "--work-dir", default=None, help="run folders and logs (default: a new temporary folder)"
    )
    parser.add_argument("--steps", nargs="+", default=None, help=f"run only these steps: {STEP_NAMES}")
    sys.exit(main(parser.parse_args()))

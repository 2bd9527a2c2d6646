"""The README's code runs as written: its Python blocks, the commands it shows, and mypy on its examples.

Markers in README.md (HTML comments, invisible on the page) on the line
before a block:

- ``<!-- file: NAME -->`` before a Python block: the block is also written to
  NAME in the working directory, where the commands after it find it;
- ``<!-- run -->`` before a bash block: every line of it is run, in order, in
  that working directory (``pyro-vae`` as ``python -m pyro_vae``, which the
  README says is the same command);
- ``<!-- synopsis -->`` before a bash block: a usage summary with
  placeholders such as ``{auto,none}``, not commands.

Every ``pyro-vae`` command of any other bash block is parsed by the command
line's own parser, which would stop at an unknown flag or a bad value.
All Python blocks and run blocks share one working directory, in README order,
so a later block may read what an earlier one wrote (``mine.nc``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
REPO = README.parent
# Each block or command has this long (the README's own examples train for seconds).
TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    marker: str | None  # the HTML comment on the line before the block, without <!-- -->
    line: int  # 1-based line of the opening fence

    @property
    def id(self) -> str:
        return f"{self.language}@{self.line}"


def readme_blocks() -> list[Block]:
    blocks, lines = [], README.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w+)", lines[i])
        if not fence:
            i += 1
            continue
        end = lines.index("```", i + 1)
        before = lines[i - 1].strip() if i else ""
        marker = re.fullmatch(r"<!--\s*(.*?)\s*-->", before)
        blocks.append(
            Block(fence.group(1), "\n".join(lines[i + 1 : end]) + "\n", marker and marker.group(1), i + 1)
        )
        i = end + 1
    return blocks


BLOCKS = readme_blocks()
PYTHON = [b for b in BLOCKS if b.language == "python"]


def commands(block: Block) -> list[list[str]]:
    """The shell command lines of a bash block as words: continuations joined, comments and blank lines dropped."""
    joined = block.text.replace("\\\n", " ")
    return [words for words in (shlex.split(line, comments=True) for line in joined.splitlines()) if words]


def pyro_vae_argv(words: list[str]) -> list[list[str]]:
    """The argument lists given to pyro-vae on a command line (several when joined by &&, || or ;)."""
    found, command = [], []
    for word in [*words, ";"]:
        if word not in ("&&", "||", ";"):
            command.append(word)
            continue
        for i, w in enumerate(command):
            if w.endswith("pyro-vae"):
                found.append(command[i + 1 :])
                break
            if w == "-m" and command[i + 1 : i + 2] == ["pyro_vae"]:
                found.append(command[i + 2 :])
                break
        command = []
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The working directory every Python block and run command of the README shares, in order."""
    return tmp_path_factory.mktemp("readme")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    # This checkout's package, whatever the environment has installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _run(argv: list[str], cwd: Path, what: str) -> None:
    done = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{what} failed with status {done.returncode}:\n{done.stdout}\n{done.stderr}"


def test_the_readme_has_what_these_tests_read():
    markers = [b.marker for b in BLOCKS if b.marker]
    assert "file: my_model.py" in markers and "run" in markers and "synopsis" in markers
    assert len(PYTHON) >= 4
    # The first two commands and the test command stay as they are.
    text = README.read_text()
    assert "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/pyro-vae train" in text
    assert "<!-- test-command -->" in text and "<!-- /test-command -->" in text


def _in_readme_order() -> list[Block]:
    return [b for b in BLOCKS if b.language == "python" or b.marker == "run"]


@pytest.mark.parametrize("block", _in_readme_order(), ids=lambda b: b.id)
def test_the_readme_block_runs_as_written(block, workdir):
    """Python blocks run as scripts; run blocks line by line. In README order, in one directory."""
    if block.language == "python":
        if block.marker and block.marker.startswith("file:"):
            (workdir / block.marker.removeprefix("file:").strip()).write_text(block.text)
        script = workdir / f"readme_block_{block.line}.py"
        script.write_text(block.text)
        _run([sys.executable, script.name], workdir, f"the Python block at README.md line {block.line}")
        return
    for words in commands(block):
        command = shlex.join(words)
        assert words[0] == "pyro-vae" and len(pyro_vae_argv(words)) == 1, (
            f"not one pyro-vae command: {command}"
        )
        _run(
            [sys.executable, "-m", "pyro_vae", *words[1:]],
            workdir,
            f"`{command}` (README.md line {block.line})",
        )


def _parsed_commands() -> list[tuple[str, list[str]]]:
    return [
        (f"line {block.line}: {shlex.join(words)}", argv)
        for block in BLOCKS
        if block.language == "bash" and block.marker not in ("run", "synopsis")
        for words in commands(block)
        for argv in pyro_vae_argv(words)
    ]


@pytest.mark.parametrize("command,argv", _parsed_commands(), ids=[c for c, _ in _parsed_commands()])
def test_the_readme_command_parses(command, argv):
    from pyro_vae.cli.main import parser

    try:
        parser().parse_args(argv)
    except SystemExit as stop:
        pytest.fail(f"README.md {command}: pyro-vae refuses its arguments (exit {stop.code})")


@pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install '.[test]')"
)
def test_mypy_finds_nothing_in_the_readme_examples(tmp_path):
    blocks = tmp_path / "blocks"
    blocks.mkdir()
    for block in PYTHON:
        (blocks / f"readme_block_{block.line}.py").write_text(block.text)
    # The package from this checkout (an editable install's import hook is invisible to mypy); errors are
    # reported in the README's blocks only.
    env = dict(_env(), MYPYPATH=str(REPO))
    cache = tmp_path / "mypy_cache"
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--cache-dir", str(cache), str(blocks)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, f"mypy on the README's Python blocks:\n{done.stdout}{done.stderr}"


def _named_in_readme(pattern: str) -> list[str]:
    return sorted(set(re.findall(pattern, README.read_text())))


@pytest.mark.parametrize("name", _named_in_readme(r"`(pyro_vae(?:\.\w+)+)"))
def test_every_dotted_name_the_readme_gives_exists(name):
    """``pyro_vae.x.y`` in the README is a module, or an attribute of one, that imports."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            if importlib.util.find_spec(module_name) is None:
                continue
        except ModuleNotFoundError:  # the part before is a module, not a package
            continue
        obj = importlib.import_module(module_name)
        for attribute in parts[split:]:
            assert hasattr(obj, attribute), f"README.md names {name}, but {obj.__name__} has no {attribute}"
            obj = getattr(obj, attribute)
        return
    pytest.fail(f"README.md names {name}, which does not import")


@pytest.mark.parametrize("path", _named_in_readme(r"`((?:pyro_vae|tests|examples|benchmarks)/[\w/.]*\w)`"))
def test_every_file_the_readme_names_exists(path):
    assert (REPO / path).exists(), f"README.md names {path}, which is not in the repository"


def test_the_readme_model_traces_under_jit():
    """The README's VAE, built from registered parts, trains with jit=True without falling back to eager."""
    import warnings

    import torch

    from pyro_vae import ModelConfig, build_vae, fit

    block = next(b for b in PYTHON if "class VAE(nn.Module)" in b.text)
    namespace: dict[str, object] = {}
    exec(compile(block.text, f"README.md line {block.line}", "exec"), namespace)
    parts = build_vae(ModelConfig(data_dim=16, latent_dims=(3,), hidden_dims=(8,)))
    vae = namespace["VAE"](  # type: ignore[operator]
        prior=parts.prior,
        likelihood=parts.likelihood,
        encoder=parts.encoder,
        guide_head=parts.guide_head,
        decoder=parts.decoder,
    )
    x = torch.bernoulli(torch.full((64, 16), 0.4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(vae, x, epochs=1, batch_size=32, jit=True, device="cpu", progress=False)
    assert result.history[-1].train_elbo < 0
    assert not [w for w in caught if "not traceable" in str(w.message)], (
        "the README's model falls back to eager"
    )


def _printed_block() -> list[str]:
    """The lines of the README's "What `pyro-vae train` prints" block."""
    text = README.read_text()
    section = text[text.index("## What `pyro-vae train` prints") :]
    start = section.index("```\n") + len("```\n")
    return section[start : section.index("```", start)].splitlines()


def _comparable(lines: list[str]) -> list[str]:
    # What differs from run to run: the seconds, and the folder named after the time (without --out).
    lines = [re.sub(r"in \d+\.\d s \(\d+\.\d+ s/epoch\)", "in T s (T s/epoch)", line) for line in lines]
    return [re.sub(r"^run saved to .*", "run saved to RUN_DIR", line) for line in lines]


def test_the_main_command_prints_the_readmes_numbers(tmp_path):
    """``pyro-vae train`` with its defaults prints the README's lines: every number but the seconds.

    On the CPU (``--device cpu``), where the README's numbers come from: a GPU's kernels round differently.
    Every line fits 100 columns.
    """
    done = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "--quiet", "train", "--device", "cpu"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout.splitlines()
    assert _comparable(printed) == _comparable(_printed_block())
    assert all(len(line) <= 100 for line in printed), [line for line in printed if len(line) > 100]

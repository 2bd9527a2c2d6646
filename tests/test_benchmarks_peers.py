"""The peers pyro_vae is timed against, in benchmarks/.

bench_peers.py: an absent or broken peer is skipped with one line and exit 0, a present one is timed (here
fake peers of the same API, so that the timing path runs without installing anything), and an unknown peer
name is refused. bench_train.py's hand-written reference: its log1p-free variant computes the same loss and
gradients as the plain one, and the smoke run prints every row and ratio line. No timed assertions: only
that the figures are there and positive."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pyro_vae.components.softplus import Softplus

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "bench_peers.py"
RATIOS = ("ratio_pyro_example", "ratio_pyro_example_jit", "ratio_pythae_epoch", "ratio_pythae_nll")

# A stand-in for Pyro's examples/vae/vae_comparison.py: the constructor and step that bench_peers calls, and an
# import from its own utils package (which the real file has too).
FAKE_EXAMPLE = {
    "utils/__init__.py": "",
    "utils/mnist_cached.py": "DATA_DIR = RESULTS_DIR = '.'\n",
    "vae_comparison.py": """
        import sys

        import torch
        from utils.mnist_cached import DATA_DIR  # noqa: F401


        class PyroVAEImpl:
            def __init__(self, args, train_loader, test_loader):
                self.args = args
                self.net = torch.nn.Linear(784, 20)
                self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-3)
                print(f"fake example built, jit={args.jit}", file=sys.stderr)

            def compute_loss_and_gradient(self, x):
                self.optimizer.zero_grad()
                loss = self.net(x).pow(2).sum()
                loss.backward()
                self.optimizer.step()
                return loss.item() / (self.args.batch_size * 784)
    """,
}

# A stand-in for pythae 0.1.2: the modules and names bench_peers imports, doing real (tiny) work.
FAKE_PYTHAE = {
    "pythae/__init__.py": "",
    "pythae/data/__init__.py": "",
    "pythae/data/datasets.py": """
        class BaseDataset:
            def __init__(self, data, labels):
                self.data, self.labels = data.float(), labels.float()
    """,
    "pythae/models/base/__init__.py": "",
    "pythae/models/base/base_utils.py": """
        class ModelOutput(dict):
            __getattr__ = dict.__getitem__
    """,
    "pythae/models/nn/__init__.py": """
        import torch

        BaseEncoder = BaseDecoder = torch.nn.Module
    """,
    "pythae/models/__init__.py": """
        import sys
        from dataclasses import dataclass

        import torch


        @dataclass
        class VAEConfig:
            input_dim: tuple
            latent_dim: int
            reconstruction_loss: str = "mse"


        class VAE(torch.nn.Module):
            def __init__(self, model_config, encoder, decoder):
                super().__init__()
                self.model_config, self.encoder, self.decoder = model_config, encoder, decoder

            def forward(self, inputs, **kwargs):
                x = inputs["data"]
                out = self.encoder(x)
                z = out.embedding + torch.exp(0.5 * out.log_covariance) * torch.randn_like(out.embedding)
                recon = self.decoder(z)["reconstruction"]
                return {"loss": torch.nn.functional.binary_cross_entropy(recon, x, reduction="sum")}

            def get_nll(self, data, n_samples=1, batch_size=100):
                print(f"fake get_nll on {len(data)} points, K={n_samples}", file=sys.stderr)
                return float(self.forward({"data": data})["loss"])
    """,
    "pythae/trainers/__init__.py": """
        import sys


        class BaseTrainerConfig:
            def __init__(self, **options):
                self.__dict__.update(options)


        class BaseTrainer:
            def __init__(self, model, train_dataset, training_config):
                self.model, self.data, self.config = model, train_dataset.data, training_config

            def prepare_training(self):
                import torch

                self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.learning_rate)

            def train_step(self, epoch):
                for x in self.data.split(self.config.per_device_train_batch_size):
                    self.optimizer.zero_grad()
                    self.model({"data": x})["loss"].backward()
                    self.optimizer.step()
                print(f"fake train_step, epoch {epoch}", file=sys.stderr)
    """,
}


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def _run(*argv: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", *argv], capture_output=True, text=True, timeout=300, env=env
    )


def _ratios(stdout: str) -> dict[str, float]:
    return {
        key: float(value) for key, value in re.findall(r"^(ratio_\w+)=(\S+)$", stdout, flags=re.MULTILINE)
    }


@pytest.fixture
def hidden_pythae(tmp_path) -> Path:
    """A folder whose ``pythae`` fails to import as an absent package does: put first on PYTHONPATH, it
    hides any pythae installed here."""
    return _write(
        tmp_path / "hide",
        {"pythae/__init__.py": "raise ModuleNotFoundError(\"No module named 'pythae'\", name='pythae')\n"},
    )


def test_absent_peers_are_skipped_with_one_line_each(tmp_path, hidden_pythae):
    done = _run("--pyro-examples", str(tmp_path / "nonexistent"), pythonpath=hidden_pythae)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    example = [line for line in lines if line.startswith("skipped pyro-example: ")]
    assert len(example) == 1 and "nonexistent" in example[0] and "--pyro-examples" in example[0], lines
    assert "skipped pythae: not installed (pip install pythae)" in lines
    assert "no peer measured" in lines and _ratios(done.stdout) == {}


def test_a_peer_that_fails_to_import_is_skipped_with_its_error(tmp_path):
    # pythae present but one of its dependencies missing; the example file there but broken.
    broken = _write(
        tmp_path / "broken",
        {
            "pythae/__init__.py": "raise ModuleNotFoundError(\"No module named 'pydantic'\", name='pydantic')\n"
        },
    )
    examples = _write(tmp_path / "examples", {"vae_comparison.py": "import no_such_module_here\n"})
    done = _run("--pyro-examples", str(examples), pythonpath=broken)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^skipped pythae: cannot import it \(.*pydantic", done.stdout, re.MULTILINE), (
        done.stdout
    )
    assert re.search(
        r"^skipped pyro-example: cannot import .*vae_comparison\.py .*no_such_module_here",
        done.stdout,
        re.MULTILINE,
    ), done.stdout


def test_present_peers_are_timed_against_pyro_vae(tmp_path):
    examples = _write(tmp_path / "examples", FAKE_EXAMPLE)
    site = _write(tmp_path / "site", FAKE_PYTHAE)
    done = _run("--pyro-examples", str(examples), pythonpath=site)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped" not in done.stdout, done.stdout
    # The fakes were the peers timed: both example variants built, pythae's epoch and get_nll called.
    for marker in (
        "fake example built, jit=False",
        "fake example built, jit=True",
        "fake train_step, epoch 2",
    ):
        assert marker in done.stderr, done.stderr
    assert "fake get_nll on 2 points, K=500" in done.stderr, done.stderr
    # One table row per figure (peer's value, ours, their ratio), then one ratio line each, all positive.
    rows = [
        line for line in done.stdout.splitlines() if re.search(r"(ms/step|s/epoch|points/s)\s+[\d.]+", line)
    ]
    assert len(rows) == 4, done.stdout
    ratios = _ratios(done.stdout)
    assert list(ratios) == list(RATIOS), done.stdout
    assert all(value > 0 for value in ratios.values()), ratios
    for row, key in zip(rows, RATIOS, strict=True):
        theirs, ours, ratio = (float(word) for word in row.split()[-3:])
        assert theirs > 0 and ours > 0 and ratio == pytest.approx(ratios[key], abs=6e-4), (row, key)


def test_an_unknown_peer_is_refused():
    done = _run("--peers", "pythae,nonsense")
    assert done.returncode == 2
    assert "unknown peer(s) nonsense" in done.stderr, done.stderr


# ---- bench_train.py's hand-written reference rows ----


def _reference_module():
    spec = importlib.util.spec_from_file_location("reference_vae", BENCHMARKS / "reference_vae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "options, dtype, rtol, atol",
    [
        # pyro_vae's log1p-free kernels against torch's softplus/BCE: equal to float64 rounding.
        ({"log1p_free": True}, torch.float64, 1e-9, 1e-10),
        # With pyro_vae's Linear as well, in float32 (the only dtype whose products go to oneDNN): equal to
        # float32 rounding.
        ({"log1p_free": True, "onednn": True}, torch.float32, 1e-4, 1e-3),
    ],
)
def test_the_references_with_pyro_vaes_kernels_compute_the_plain_references_loss_and_gradients(
    options, dtype, rtol, atol
):
    # Known answer: the same weights and noise through torch's own layers and through pyro_vae's kernels
    # give the same single-sample ELBO and the same gradient.
    from pyro_vae.components import Linear

    reference = _reference_module().ReferenceVAE
    plain = reference(data_dim=30, hidden=16, latent=3).to(dtype)
    fast = reference(data_dim=30, hidden=16, latent=3, **options).to(dtype)
    fast.load_state_dict(plain.state_dict())
    x = torch.bernoulli(torch.full((8, 30), 0.3, dtype=dtype))
    losses, grads = [], []
    for model in (plain, fast):
        torch.manual_seed(1)
        loss = model.loss(x, num_data=100)
        losses.append(loss.detach())
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]))
    assert isinstance(fast.encoder[1], Softplus) and not isinstance(plain.encoder[1], Softplus)
    assert isinstance(fast.encoder[0], Linear) == bool(options.get("onednn"))
    torch.testing.assert_close(
        losses[1], losses[0], rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=atol
    )
    torch.testing.assert_close(grads[1], grads[0], rtol=rtol, atol=atol)


def test_bench_train_smoke_run_prints_every_row_and_ratio_line():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_train.py"), "--smoke-test", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    names = [
        "hand-written PyTorch",
        "hand-written, fused Adam",
        "hand-written, fused, log1p-free",
        "hand-written, pyro_vae's kernels",
        "pyro_vae (default)",
        "pyro_vae --jit",
        "pyro_vae --no-fused-adam",
    ]
    table = {}
    for line in done.stdout.splitlines():
        for name in names:
            if line.split(maxsplit=1)[-1].startswith(name + " "):
                table[name] = [
                    float(word) for word in line.split()[-5:]
                ]  # ms/step, ratio, /fused, /log1p-free, /kernels
    assert list(table) == names, done.stdout
    assert table["hand-written PyTorch"][1] == 1.0 and table["hand-written, fused Adam"][2] == 1.0
    assert table["hand-written, fused, log1p-free"][3] == 1.0
    assert table["hand-written, pyro_vae's kernels"][4] == 1.0
    # The last lines, ratio= first (benchmarks/gpu_check.py reports them in order), are the default's row.
    tail = done.stdout.strip().splitlines()[-4:]
    assert [line.split("=")[0] for line in tail] == [
        "ratio",
        "ratio_fused",
        "ratio_log1p_free",
        "ratio_kernels",
    ], tail
    for line, column in zip(tail, (1, 2, 3, 4), strict=True):
        assert float(line.split("=")[1]) == pytest.approx(table["pyro_vae (default)"][column], abs=6e-4), line

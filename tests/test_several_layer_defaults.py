"""pyro-vae train's defaults for several latent layers: the ladder with KL warm-up (benchmarks/README.md, issue 15)."""

from __future__ import annotations

import json

import pytest

from pyro_vae.cli import main
from pyro_vae.cli.main import parser
from pyro_vae.cli.train import SEVERAL_LAYER_WARMUP, fill_several_layer_defaults


def _resolved(*flags: str) -> tuple[str | None, int]:
    args = parser().parse_args(["train", "--dataset", "digits", *flags])
    fill_several_layer_defaults(args)
    return args.inference, args.warmup_epochs


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--latent-dims", "8,4", "--epochs", "20"), ("ladder", SEVERAL_LAYER_WARMUP)),
        (("--latent-dims", "8,4,2", "--epochs", "4"), ("ladder", SEVERAL_LAYER_WARMUP)),
        # Too short a run, IWAE (no KL term) and --jit (one traced KL weight): no warm-up, so bottom-up.
        (("--latent-dims", "8,4", "--epochs", "3"), ("bottom-up", 0)),
        (("--latent-dims", "8,4", "--epochs", "20", "--loss", "iwae"), ("bottom-up", 0)),
        (("--latent-dims", "8,4", "--epochs", "20", "--jit"), ("bottom-up", 0)),
        # What is given is kept; the ladder follows the warm-up unless inference is given too.
        (("--latent-dims", "8,4", "--epochs", "20", "--warmup-epochs", "0"), ("bottom-up", 0)),
        (("--latent-dims", "8,4", "--epochs", "20", "--warmup-epochs", "5"), ("ladder", 5)),
        (
            ("--latent-dims", "8,4", "--epochs", "20", "--inference", "bottom-up"),
            ("bottom-up", SEVERAL_LAYER_WARMUP),
        ),
        # One latent layer keeps the defaults it always had.
        (("--latent-dims", "8", "--epochs", "20"), ("bottom-up", 0)),
    ],
)
def test_defaults_follow_the_model(flags: tuple[str, ...], expected: tuple[str, int]) -> None:
    assert _resolved(*flags) == expected


def test_a_two_layer_run_records_the_resolved_defaults(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = main(
        ["train", "--dataset", "digits", "--latent-dims", "4,2", "--hidden-dims", "16", "--epochs", "4",
         "--eval-samples", "0", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["options"]["inference"] == "ladder"
    assert config["train"]["warmup_epochs"] == SEVERAL_LAYER_WARMUP
    assert "ladder inference, KL warm-up 2 epochs" in capsys.readouterr().out


def test_resume_continues_with_the_choices_the_run_was_trained_with(tmp_path) -> None:
    # One epoch resolves to bottom-up without warm-up (too short a run); resumed to 4 epochs with the same
    # flags, the defaults would say ladder with warm-up, a different model: the run's own choices win.
    out = tmp_path / "run"
    flags = ["train", "--dataset", "digits", "--latent-dims", "4,2", "--hidden-dims", "16", "--eval-samples", "0",
             "--out", str(out)]  # fmt: skip
    assert main([*flags, "--epochs", "1"]) == 0
    assert main([*flags, "--epochs", "4", "--resume"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["options"]["inference"] == "bottom-up"
    assert config["train"]["warmup_epochs"] == 0 and config["train"]["epochs"] == 4

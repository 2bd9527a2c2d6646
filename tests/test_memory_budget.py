"""The memory budget of an evaluation's passes: measured on the model, planned to fit, held in resident memory.

:func:`~pyro_vae.resources.plan_passes` runs a pass on a few rows, counts the bytes its tensors hold
(:func:`~pyro_vae.resources.peak_bytes`) and sizes the passes to the budget. Checked here: the count
itself on known allocations; for every registered prior, likelihood, guide and network that a pass of
the planned size holds no more than its rows times the measured cost (the assumption the plan rests
on) and that the plan fits the budget; in a fresh process, that the resident memory a 500-component
VampPrior on 784-pixel data adds stays under a small budget (and that without one it does not); that
the default budget leaves a plain VAE's passes, and so its numbers, as they were; that a budget that
cuts the passes gives the known log p(x) within Monte-Carlo error; and the refusals.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pyro
import pytest
import torch

from pyro_vae import ModelConfig, build_vae, evaluate_bounds
from pyro_vae.cli import main
from pyro_vae.errors import PyroVAEError
from pyro_vae.inference.ais import AnnealingSettings, ais, budgeted_chunk_rows, chunk_rows
from pyro_vae.inference.conditioning import per_datum_pair
from pyro_vae.inference.traces import MAX_MEMORY, rows_per_pass, traced_weights
from pyro_vae.resources import (
    ALLOCATOR_SLACK,
    HEADROOM,
    check_evaluation_fits,
    memory_size,
    peak_bytes,
    plan_passes,
)
from tests.test_contract import CASES, DEFAULTS, config, data_for
from tests.test_evaluation_known_answer import LinearGaussian

MiB = 1024**2


def one_pass_of(model, guide, x):
    """The pass evaluate_bounds makes, as plan_passes measures it."""
    pair = per_datum_pair(model, guide, x)

    def one_pass(xs, k):
        return traced_weights(
            pair.model, pair.guide, xs, num_samples=k, max_plate_nesting=pair.max_plate_nesting
        )

    return one_pass


@pytest.mark.parametrize(
    "text, size",
    [
        ("2GiB", 2 * 1024**3),
        ("512 MiB", 512 * MiB),
        ("1.5GB", 1_500_000_000),
        ("64kib", 65536),
        ("4e9", 4_000_000_000),
        ("1073741824", 1024**3),
        (4096, 4096),
    ],
)
def test_memory_sizes_read_binary_and_decimal_units(text, size):
    assert memory_size(text) == size


@pytest.mark.parametrize("text", ["2 GiBs", "-1GiB", "0", "lots", "", "1e-3", True])
def test_memory_sizes_refuse_what_is_not_a_size(text):
    with pytest.raises(PyroVAEError, match="memory size"):
        memory_size(text)


def test_peak_bytes_counts_the_tensors_alive_at_once_and_not_views_or_what_was_there():
    before = torch.ones(10_000)  # made outside: not counted

    def work():
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 4000 more: 8000 alive
        view = b[10:]  # a view: no new storage
        alias = before[100:].reshape(-1)  # a view of a tensor made before: not counted either
        b.add_(1)  # in place: no new storage
        del a
        c = torch.zeros(500, dtype=torch.float64)  # 4000: b and c alive, 8000
        return view.sum() + c.sum() + alias.sum()  # three 4-8 byte scalars and the result

    peak = peak_bytes(work)
    assert 8000 <= peak <= 8000 + 64, peak


@pytest.mark.parametrize("case", CASES)
def test_every_registered_component_gets_passes_whose_measured_memory_fits_the_budget(case):
    fields = CASES[case]
    vae = build_vae(config(**fields))
    x = data_for(str(fields.get("likelihood", DEFAULTS.likelihood)))
    one_pass = one_pass_of(vae.model, vae.guide, x)
    budget, num_samples = 82 * MiB, 4000  # 1.6 MiB for the passes: fewer than the 48,000 rows of all of x
    sizes = plan_passes(one_pass, x, num_samples=num_samples, chunk_size=1000, max_memory=budget)
    usable = HEADROOM * budget - ALLOCATOR_SLACK
    assert sizes.rows < x.shape[0] * min(1000, num_samples), "the budget should have cut the passes"
    assert sizes.bytes <= usable
    # What the plan rests on: a pass of the planned size holds no more than its rows times the measured cost.
    with torch.no_grad(), pyro.validation_enabled(False):
        actual = peak_bytes(lambda: one_pass(x[: sizes.data], sizes.particles))
    assert actual <= sizes.rows * sizes.row_bytes, (actual, sizes)
    assert actual + sizes.data * sizes.held_bytes <= usable
    bounds = evaluate_bounds(vae.model, vae.guide, x, num_samples=200, max_memory=budget)
    assert torch.isfinite(bounds.log_px).all() and (bounds.elbo <= bounds.log_px + 1e-9).all()


# Run in a fresh process, so that the memory counts only this evaluation: a warm-up evaluation of one datum
# first (libraries load, caches fill), then the anonymous resident memory (resident less file-backed pages:
# the shared libraries' pages come and go with the machine's load) before, and its peak during the
# evaluation, read by a thread every half millisecond.
_RESIDENT = r"""
import json, resource, sys, threading, time
import pyro, torch
from pyro_vae import ModelConfig, build_vae, evaluate_bounds
torch.set_num_threads(1)
budget = None if sys.argv[1] == "none" else int(sys.argv[1])
pyro.set_rng_seed(0)
vae = build_vae(ModelConfig(data_dim=784, latent_dims=(40,), hidden_dims=(300, 300), prior="vamp",
                            prior_options={"num_components": 500}))
x = torch.bernoulli(torch.full((16, 784), 0.2))
evaluate_bounds(vae.model, vae.guide, x[:1], num_samples=2, max_memory=budget, progress=False)

def anonymous():
    with open("/proc/self/statm") as f:
        _, resident, shared, *_ = map(int, f.read().split())
    return (resident - shared) * resource.getpagesize()

peak, done = [anonymous()], threading.Event()

def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anonymous())
        time.sleep(0.0005)

before = anonymous()
watcher = threading.Thread(target=watch)
watcher.start()
bounds = evaluate_bounds(vae.model, vae.guide, x, num_samples=200, max_memory=budget, progress=False)
done.set()
watcher.join()
print(json.dumps({"added": max(peak[0], anonymous()) - before, "log_px": bounds.log_px.tolist()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_a_vamp_prior_of_500_components_adds_less_resident_memory_than_a_small_budget():
    def run(budget):
        done = subprocess.run(
            [sys.executable, "-c", _RESIDENT, budget], capture_output=True, text=True, check=True
        )
        return json.loads(done.stdout.splitlines()[-1])

    for budget in (96 * MiB, 256 * MiB):
        within = run(str(budget))
        assert within["added"] < budget, f"{within['added'] / MiB:.1f} MiB added under {budget / MiB} MiB"
        assert all(math.isfinite(v) for v in within["log_px"])
    # Without a budget the same evaluation (3,200 rows of [500, 40] floats in log p(z) in one pass) does not
    # fit: the measurement above can fail.
    unbounded = run("none")
    assert unbounded["added"] > budget, f"{unbounded['added'] / MiB:.1f} MiB added"


def test_the_default_budget_keeps_the_passes_and_the_numbers_of_a_plain_vae():
    vae = build_vae(ModelConfig(data_dim=784, latent_dims=(50,), hidden_dims=(400,)))
    x = torch.bernoulli(torch.full((70, 784), 0.2))
    sizes = plan_passes(one_pass_of(vae.model, vae.guide, x), x, num_samples=1000, chunk_size=1000)
    assert (sizes.particles, sizes.data) == (
        1000,
        rows_per_pass(x) // 1000,
    ) and sizes.max_memory == MAX_MEMORY
    pyro.set_rng_seed(5)
    budgeted = evaluate_bounds(vae.model, vae.guide, x[:8], num_samples=300)
    pyro.set_rng_seed(5)
    unbudgeted = evaluate_bounds(vae.model, vae.guide, x[:8], num_samples=300, max_memory=None)
    assert torch.equal(budgeted.log_px, unbudgeted.log_px) and torch.equal(budgeted.elbo, unbudgeted.elbo)


@pytest.mark.parametrize("split_data, sizes", [(True, (1677, 1)), (False, (167, 10))])
def test_the_plan_of_a_pass_of_known_cost(split_data, sizes):
    """A pass that holds k x n x 1000 float32 (4000 bytes a row): the sizes are the budget's arithmetic."""
    x, seen = torch.zeros(10, 3), []

    def one_pass(xs, k):
        seen.append(xs.shape[0])
        return torch.ones(k, xs.shape[0], 1000)

    budget = 88 * MiB  # 0.8 x 88 MiB - 64 MiB = 6,710,886 bytes for the passes
    plan = plan_passes(
        one_pass,
        x,
        num_samples=10_000,
        chunk_size=10_000,
        max_memory=budget,
        held_bytes_per_sample=0,
        split_data=split_data,
    )
    assert (plan.particles, plan.data) == sizes and plan.row_bytes == 4000
    assert split_data or seen == [10], "a pass that cannot take a subset of x is measured on all of it"


def test_the_measuring_pass_draws_nothing_from_the_random_stream():
    vae = build_vae(config(prior="vamp"))
    x = data_for(DEFAULTS.likelihood)
    state = torch.get_rng_state()
    plan_passes(one_pass_of(vae.model, vae.guide, x), x, num_samples=100, chunk_size=100)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_budget_that_cuts_the_passes_gives_the_known_log_px_within_monte_carlo_error(float64):
    lg = LinearGaussian.random(d=2, p=5)
    x = lg.sample_data(20)
    exact = lg.exact_log_px(x)
    budget = 81 * MiB  # about 0.8 MiB for the passes: a few data points of 1000 particles each
    sizes = plan_passes(
        one_pass_of(lg.model, lg.wrong_guide, x), x, num_samples=1000, chunk_size=1000, max_memory=budget
    )
    assert sizes.data < x.shape[0], "the budget should have cut the data into chunks"

    def run(max_memory, seed=0):
        pyro.set_rng_seed(seed)
        return evaluate_bounds(lg.model, lg.wrong_guide, x, num_samples=1000, max_memory=max_memory)

    cut, whole = run(budget), run(None)
    assert not torch.equal(cut.log_px, whole.log_px), "other passes, other draws (documented)"
    combined = torch.sqrt(cut.log_px_stderr**2 + whole.log_px_stderr**2)
    assert torch.all((cut.log_px - whole.log_px).abs() < 5 * combined)
    assert torch.all((cut.log_px - exact).abs() < 5 * cut.log_px_stderr)
    assert torch.equal(run(budget).log_px, cut.log_px), "the same seed and budget give the same numbers"


def test_a_row_that_does_not_fit_is_refused_naming_the_budget_and_how_to_raise_it():
    vae = build_vae(
        ModelConfig(
            data_dim=784,
            latent_dims=(40,),
            hidden_dims=(64,),
            prior="vamp",
            prior_options={"num_components": 500},
        )
    )
    x = torch.bernoulli(torch.full((4, 784), 0.2))
    with pytest.raises(PyroVAEError, match=r"memory budget of 80\.5 MiB.*--max-memory"):
        evaluate_bounds(vae.model, vae.guide, x, num_samples=100, max_memory=int(80.5 * MiB))


@pytest.mark.parametrize(
    "budget, num_samples, message",
    [
        (16 * MiB, 10, "leaves nothing for"),  # under the allocator's slack
        (128 * MiB, 1_000_000, "does not fit in the memory budget of 128.0 MiB"),  # one datum's log-weights
        (0, 10, "max_memory must be a whole number of bytes"),
        ("2GiB", 10, "max_memory must be a whole number of bytes"),
    ],
)
def test_budgets_that_cannot_hold_a_pass_are_refused(budget, num_samples, message):
    lg = LinearGaussian.random(d=2, p=5)
    x = lg.sample_data(3).float()
    with pytest.raises(PyroVAEError, match=message):
        evaluate_bounds(lg.model, lg.wrong_guide, x, num_samples=num_samples, max_memory=budget)


def test_the_final_evaluation_of_train_is_refused_before_training_when_its_log_weights_cannot_fit():
    with pytest.raises(PyroVAEError, match="--eval-max-memory"):
        check_evaluation_fits(
            num_samples=50_000_000, num_data=1, device=torch.device("cpu"), max_memory=MAX_MEMORY
        )
    check_evaluation_fits(num_samples=1000, num_data=10, device=torch.device("cpu"), max_memory=MAX_MEMORY)


def test_the_commands_take_the_budget_and_refuse_a_bad_one(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--epochs", "1", "--hidden-dims", "16", "--latent-dims", "2", "--eval-samples", "50"]
    assert main([*argv, "--eval-max-memory", "96MiB", "--out", str(out)]) == 0
    assert main(["evaluate", str(out), "--num-samples", "50", "--max-memory", "96MiB", "--limit", "20"]) == 0
    assert "log p(x) (IS)" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--num-samples", "50", "--max-memory", "16MiB"]) == 2
    assert "leaves nothing for" in capsys.readouterr().err
    # The inference gaps take the budget too: their log p(x) and ELBO passes are planned to it.
    gaps = [
        "evaluate",
        str(out),
        "--method",
        "gaps",
        "--limit",
        "4",
        "--num-samples",
        "50",
        "--log-px-method",
        "is",
    ]
    assert main([*gaps, "--optimize-steps", "2", "--max-memory", "96MiB"]) == 0
    assert "amortization gap" in capsys.readouterr().out
    assert main([*gaps, "--max-memory", "16MiB"]) == 2
    assert "leaves nothing for" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(out), "--max-memory", "lots"])
    assert exit_info.value.code == 2 and "memory size" in capsys.readouterr().err


def test_ais_chunks_are_sized_to_the_budget_and_keep_the_exact_answer(float64):
    lg = LinearGaussian.random(2, 5, s=0.5)
    x = lg.sample_data(200)
    settings = AnnealingSettings(num_steps=3, num_chains=64, pilot_chains=0)
    budget = 81 * MiB  # about 0.8 MiB for a chunk's transitions
    pair = per_datum_pair(lg.model, lg.exact_guide, x)
    size = budgeted_chunk_rows(pair, x, settings, None, max_memory=budget)
    assert size < min(x.shape[0], chunk_rows(settings, None)), "the budget should have cut the chunks"
    assert budgeted_chunk_rows(pair, x, settings, None) == min(x.shape[0], chunk_rows(settings, None))
    # With the exact posterior as the start every weight is p(x): exact whatever the chunks.
    result = ais(lg.model, lg.exact_guide, x, settings=settings, max_memory=budget)
    torch.testing.assert_close(result.log_px, lg.exact_log_px(x), rtol=0, atol=1e-9)
    many = AnnealingSettings(num_steps=3, num_chains=200_000, pilot_chains=0)
    with pytest.raises(PyroVAEError, match=r"does not fit in the memory budget.*--num-chains"):
        ais(lg.model, lg.exact_guide, x[:2], settings=many, max_memory=budget)


def test_a_second_evaluation_of_the_same_model_and_data_shape_reuses_the_measurement(monkeypatch):
    import pyro_vae.resources as resources

    calls = []
    measure = resources._measure
    monkeypatch.setattr(resources, "_measure", lambda *a: calls.append(a[1].shape) or measure(*a))
    monkeypatch.setattr(resources, "_MEASURED", type(resources._MEASURED)())
    x = torch.bernoulli(torch.full((30, 20), 0.3))
    vae = build_vae(ModelConfig(data_dim=20, latent_dims=(2,), hidden_dims=(8,)))
    results = []
    for _ in range(2):
        pyro.set_rng_seed(5)
        results.append(evaluate_bounds(vae.model, vae.guide, x, num_samples=50, diagnostics=False))
    assert len(calls) == 1  # measured once; the second plan read it back
    # Skipping the measurement changes no draw: the measuring pass runs on a fork of the random stream.
    assert torch.equal(results[0].log_px, results[1].log_px)
    evaluate_bounds(vae.model, vae.guide, x[:20], num_samples=50, diagnostics=False)
    assert len(calls) == 1  # fewer data points, the same measuring pass: its cost is known
    # A model resized in place is a new structure, and is measured again.
    wider = build_vae(ModelConfig(data_dim=20, latent_dims=(2,), hidden_dims=(16,)))
    vae.decoder = wider.decoder
    vae.encoder = wider.encoder
    vae.guide_head = wider.guide_head
    evaluate_bounds(vae.model, vae.guide, x, num_samples=50, diagnostics=False)
    assert len(calls) == 2


def test_cpu_passes_keep_a_data_wide_tensor_under_the_malloc_threshold_and_gpu_passes_stay_large():
    from pyro_vae.inference.traces import CPU_PASS_BYTES, MIN_ROWS_PER_PASS, ROWS_PER_PASS

    mnist, digits, wide = torch.zeros(3, 784), torch.zeros(3, 64), torch.zeros(3, 3, 64, 64)
    assert rows_per_pass(mnist) * 784 * 4 <= CPU_PASS_BYTES < (rows_per_pass(mnist) + 1) * 784 * 4
    assert rows_per_pass(digits) == ROWS_PER_PASS  # narrow rows: the passes stay as large as before
    assert rows_per_pass(wide) == max(MIN_ROWS_PER_PASS, CPU_PASS_BYTES // (4 * 3 * 64 * 64))
    assert rows_per_pass(torch.zeros(3, 784, device="meta")) == ROWS_PER_PASS  # not a CPU: large passes

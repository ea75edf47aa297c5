"""The sweep's TuneConfig keeps to its concurrency limit with every search algorithm, on a real (in-process)
Ray: Tune ignores `TuneConfig.max_concurrent_trials` for a `BasicVariantGenerator` given as the searcher,
which once let every trial of a seeded grid start at once and wait for workers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orchestrator.grid import load_grid
from orchestrator.tune import param_space, tune_config

from jobkit import edit
from test_grid import GOOD, write

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("glue_dir")]


@pytest.fixture(scope="module")
def ray_with_room_for_four_trials():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("search", ["{algorithm: grid}", "{algorithm: grid, seed: null}", "{algorithm: random, seed: 3}",
                                    "{algorithm: optuna, seed: 3}"])
def test_at_most_max_concurrent_trials_run_at_once(tmp_path: Path, search: str, ray_with_room_for_four_trials):
    from ray import tune

    def trial(config: dict) -> None:  # nested: pickled by value (Ray's workers cannot import this test module)
        start = time.time()
        time.sleep(1.5)
        tune.report({"eval/accuracy": 0.5, "started": start, "ended": time.time()})

    text = edit(GOOD, "    training.learning_rate: {loguniform: [1.0e-5, 1.0e-4]}\n", "")
    samples = 2  # x 2 students
    if "grid" not in search:  # random and optuna draw 4 samples from choices
        text = edit(text, "    objective.preset: {grid: [ckd-paper]}\n", "")
        text, samples = edit(text, "      grid:\n", "      choice:\n"), 4
    text = edit(text, "  samples: 2", f"  samples: {samples}\n  search: {search}\n  max_concurrent_trials: 1")
    grid = load_grid(write(tmp_path, text))
    assert grid.total_trials() == 4
    concurrent = grid.concurrent_trials(cpus=4)
    assert concurrent == 1
    tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 1}), param_space=param_space(grid.sweep),
                       tune_config=tune_config(grid, concurrent),
                       run_config=tune.RunConfig(name="concurrency", storage_path=str(tmp_path / "tune")))
    results = tuner.fit()
    assert not results.errors, results.errors
    spans = sorted((r.metrics["started"], r.metrics["ended"]) for r in results)
    assert len(spans) == 4
    overlaps = [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]
    assert overlaps == [], f"trials ran at once although max_concurrent_trials is 1: {spans}"

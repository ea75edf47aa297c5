"""Ray Tune wiring: a validated grid turned into Tune's param space, searcher, scheduler and `Tuner`.

Nothing here validates: the grid was checked when it was loaded. Ray is imported inside the functions, so
that loading a grid (and `plan`) never imports it.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import TYPE_CHECKING, Any

from orchestrator.space import TRIAL_DRIVER_CPUS, Domain, SchedulerSpec, SearchSpec, SweepSpec

if TYPE_CHECKING:
    from orchestrator.grid import GridSpec
    from orchestrator.state import SweepDir
    from orchestrator.trial import TrialContext

__all__ = ["ASHA_UNBOUNDED_MAX_T", "build_tuner", "param_space", "ray_resources", "scheduler", "search_algorithm",
           "to_tune", "tune_config"]

log = logging.getLogger("orchestrator.driver")

# ASHA's max_t when none is given: high enough never to stop a trial that is still improving; the rungs
# below the trials' real length are the same as with a tight bound.
ASHA_UNBOUNDED_MAX_T = 1_000_000


def to_tune(domain: Domain) -> Any:
    """The Ray Tune domain of one search domain (`tune.grid_search(...)` is a plain dict)."""
    from ray import tune

    if domain.kind == "grid":
        return tune.grid_search(copy.deepcopy(domain.values))
    if domain.kind == "choice":
        return tune.choice(copy.deepcopy(domain.values))
    if domain.kind == "randint":
        return tune.randint(int(domain.low), int(domain.high) + 1)  # Tune's upper bound is exclusive
    if domain.kind == "uniform":
        return tune.uniform(domain.low, domain.high)
    if domain.kind == "loguniform":
        return tune.loguniform(domain.low, domain.high)
    if domain.kind == "quniform":
        return tune.quniform(domain.low, domain.high, domain.q)
    return tune.qloguniform(domain.low, domain.high, domain.q)


def param_space(sweep: SweepSpec) -> dict[str, Any]:
    """Ray Tune's param_space: {dotted job key: tune.grid_search([...]) | tune.choice(...) | ...}."""
    return {key: to_tune(domain) for key, domain in sweep.space.items()}


def search_algorithm(search: SearchSpec, max_concurrent: int = 0) -> Any:
    """The Tune searcher: a `BasicVariantGenerator` (grid, random; seeded unless the seed is None) or an
    `OptunaSearch` (TPE). Created without metric/mode: pass `TuneConfig(metric=grid.metric_name,
    mode=grid.metric_mode)`.

    Args:
        search: the grid's `sweep.search`.
        max_concurrent: trials running at once (0: no limit). A `BasicVariantGenerator` given as the search
            algorithm must carry it itself: Tune ignores `TuneConfig.max_concurrent_trials` for one (it
            wraps only other searchers), and every trial would start at once and wait for workers.
    """
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # Mappings (paired values) are fine as categorical choices with Optuna's in-memory storage,
        # which Tune uses; Optuna warns only because a persistent storage could not hold them.
        warnings.filterwarnings("ignore", message="Choices for a categorical distribution should be",
                                category=UserWarning)
        return OptunaSearch(seed=search.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=search.seed, max_concurrent=max_concurrent)


def scheduler(spec: SchedulerSpec) -> Any:
    """The Tune scheduler: `FIFOScheduler`, or `ASHAScheduler` over training_iteration (evaluation
    rounds). Created without metric/mode (they come from the TuneConfig)."""
    if spec.kind == "fifo":
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=spec.max_t or ASHA_UNBOUNDED_MAX_T,
                         grace_period=spec.grace_period or 1, reduction_factor=spec.reduction_factor or 2)


def ray_resources() -> dict[str, float]:
    """The CPUs and GPUs (and other resources) of the Ray cluster this process is connected to."""
    import ray

    return ray.cluster_resources()


def build_tuner(sweep: SweepDir, grid: GridSpec, context: TrialContext) -> Any:
    """The sweep's `Tuner`: a new one, or the one restored from `sweep.tune_dir` (a resume, a requeue).

    Args:
        sweep: the sweep directory (Tune keeps its state under it).
        grid: the sweep's grid, as loaded from its record.
        context: what every trial needs; the same trainable (with this context) is given to a restored
            Tuner, which does not keep it.

    Raises:
        RuntimeError: no trial fits on the Ray cluster.
    """
    from ray import tune

    from orchestrator.trial import run_trial

    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": TRIAL_DRIVER_CPUS})
    if tune.Tuner.can_restore(str(sweep.tune_dir)):
        log.info("restoring the Tune experiment in %s", sweep.tune_dir)
        return tune.Tuner.restore(str(sweep.tune_dir), trainable, resume_unfinished=True, resume_errored=True)
    s = grid.sweep
    resources = ray_resources()
    concurrent = grid.concurrent_trials(resources.get("CPU", 0), resources.get("GPU", 0))
    if concurrent < 1:
        raise RuntimeError(f"a trial needs {s.resources.cpus:g} CPUs and {s.resources.gpus:g} GPUs; the Ray "
                           f"cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs")
    return tune.Tuner(
        trainable,
        param_space=param_space(s),
        tune_config=tune_config(grid, concurrent),
        run_config=tune.RunConfig(name=sweep.tune_dir.name, storage_path=str(sweep.path),
                                  failure_config=tune.FailureConfig(max_failures=s.max_failures)),
    )


def tune_config(grid: GridSpec, concurrent: int) -> Any:
    """The sweep's `TuneConfig`: metric, samples, searcher and scheduler, at most `concurrent` trials at once."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s = grid.sweep
    searcher = search_algorithm(s.search, max_concurrent=concurrent)
    return tune.TuneConfig(metric=grid.metric_name, mode=grid.metric_mode, num_samples=s.samples,
                           search_alg=searcher, scheduler=scheduler(s.scheduler),
                           # Tune wraps any other searcher in its own limiter.
                           max_concurrent_trials=None if isinstance(searcher, BasicVariantGenerator) else concurrent)

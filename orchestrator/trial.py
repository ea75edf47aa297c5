"""One trial of a sweep: a Tune function that fits a Ray Train `TorchTrainer` of DeepSpeed workers.

The driver decides, the trial trains: the driver builds one `TrialContext` (the resolved base job, where
the sweep and its MLflow runs live, the trial's resources) from the grid it validated, and Tune hands it to
every trial with `tune.with_parameters`. A trial applies its values to the base job, validates that one
job, and trains it; it never reads the grid.

The trial's job writes into `<sweep>/trials/<trial id>/` and logs to its own MLflow child run, whose
id is kept there, so a trial retried after a failure (or restored after the driver was killed)
continues the same run from its last DeepSpeed checkpoint instead of starting a second one.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.reporting import MlflowReporter, Reporter
from orchestrator.space import apply_trial, trial_label, trial_value_label

if TYPE_CHECKING:
    from orchestrator.grid import GridSpec
    from orchestrator.state import SweepDir


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep needs, built once by the driver from the grid it loaded (picklable: Tune
    ships it to each trial through the object store).

    Attributes:
        sweep_dir: the sweep directory (trials write under trials/ and train/ there).
        sweep_id: the sweep's id (an MLflow tag of every trial run).
        parent_run_id: the sweep's MLflow parent run, or None when there is none.
        base_job: the resolved base job mapping (absolute paths, defaults) the trials' values are applied to.
        base_dir: the grid file's directory: relative paths in swept values are resolved against it.
        tracking_uri: the sweep's MLflow store.
        experiment: the sweep's MLflow experiment.
        workers: Ray Train workers per trial (the job's data-parallel world).
        cpus_per_worker: CPUs each worker holds.
        gpus_per_worker: GPUs each worker holds (0: CPU training with gloo).
    """

    sweep_dir: str
    sweep_id: str
    parent_run_id: str | None
    base_job: Mapping[str, Any]
    base_dir: str
    tracking_uri: str
    experiment: str
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float

    @classmethod
    def for_sweep(cls, sweep: SweepDir, grid: GridSpec, parent_run_id: str | None) -> TrialContext:
        """The context of the trials of `sweep`, run from `grid` (after the parent run is started)."""
        resources = grid.sweep.resources
        assert grid.mlflow.experiment is not None  # filled in when the grid was loaded
        return cls(sweep_dir=str(sweep.path), sweep_id=sweep.sweep_id, parent_run_id=parent_run_id,
                   base_job=grid.job, base_dir=str(grid.base_dir), tracking_uri=grid.tracking_uri(),
                   experiment=grid.mlflow.experiment, workers=resources.workers,
                   cpus_per_worker=resources.cpus_per_worker, gpus_per_worker=resources.gpus_per_worker)

    def trial_dir(self, trial_id: str) -> Path:
        """Where the trial's job writes (its checkpoints, metrics and exported student)."""
        return Path(self.sweep_dir) / "trials" / trial_id

    def trial_job(self, trial_config: Mapping[str, Any], trial_id: str) -> dict[str, Any]:
        """The trial's job mapping: the base job with the trial's values, its own output dir and the
        sweep's MLflow store.

        Raises:
            ValueError: a value's key runs through a value of the base job that is not a mapping.
        """
        job = apply_trial(self.base_job, trial_config)
        job["output"] = {"dir": str(self.trial_dir(trial_id)),
                         "mlflow": {"tracking_uri": self.tracking_uri, "experiment": self.experiment,
                                    "log_model": True}}
        return job


class RayReporter(Reporter):
    """MLflow on the main rank, plus `ray.train.report` on every rank at each evaluation so Tune's
    scheduler (ASHA) sees the metric. The reported checkpoint is a small pointer to the job's own
    DeepSpeed checkpoint on the sweep's storage (not a second copy of the weights)."""

    def __init__(self, mlflow: MlflowReporter, is_main: bool) -> None:
        self.mlflow = mlflow
        self.is_main = is_main

    def start(self, spec: Any, *, resumed: bool) -> None:
        self.mlflow.start(spec, resumed=resumed)

    def train_step(self, step: int, scalars: Mapping[str, float]) -> None:
        self.mlflow.train_step(step, scalars)

    def evaluated(self, step: int, metrics: Mapping[str, float], *, checkpoint: Path | None) -> None:
        import ray.train

        self.mlflow.evaluated(step, metrics, checkpoint=checkpoint)
        report = {**metrics, "step": step}
        if self.is_main and checkpoint is not None:
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "pointer.json").write_text(json.dumps({"deepspeed_checkpoint": str(checkpoint),
                                                                    "step": step}))
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(report)

    def finish(self, summary: Mapping[str, float], student_dir: Path) -> None:
        self.mlflow.finish(summary, student_dir)

    def already_finished(self, last_evaluation: Mapping[str, float]) -> None:
        import ray.train

        ray.train.report(dict(last_evaluation))  # so Tune has the trial's result; MLflow already has it

    def failed(self, error: BaseException) -> None:
        self.mlflow.failed(error)


class TrialReporterFactory:
    """Picklable: shipped to each Ray Train worker, which builds its reporter for its rank."""

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, str],
                 extra_params: Mapping[str, str]) -> None:
        self.kwargs = dict(tracking_uri=tracking_uri, experiment=experiment, run_name=run_name, tags=dict(tags),
                           extra_params=dict(extra_params))

    def __call__(self, env: Any, spec: Any) -> Reporter:
        return RayReporter(MlflowReporter(spec, is_main=env.is_main, **self.kwargs), env.is_main)


def run_trial(trial_config: dict[str, Any], *, context: TrialContext) -> None:
    """The Tune function of a trial (wrapped with `tune.with_parameters(run_trial, context=...)`)."""
    import ray.tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.distill import worker_loop
    from jobs.spec import JobSpec

    trial_id = ray.tune.get_context().get_trial_id()
    spec = JobSpec.from_mapping(context.trial_job(trial_config, trial_id), base_dir=context.base_dir)
    label = trial_label(trial_config)
    tags = {"ckd.sweep_id": context.sweep_id, "ckd.trial_id": trial_id, "ckd.role": "trial",
            "ckd.trial_label": label, "mlflow.source.name": "ckd-orchestrate trial",
            "ckd.trial_config": json.dumps(trial_config, sort_keys=True, default=str)[:5000]}
    if context.parent_run_id:
        tags["mlflow.parentRunId"] = context.parent_run_id
    # The sweep axes as short readable columns (the full values are in the tag above and in the params).
    params = {f"trial.{key}": trial_value_label(key, value) for key, value in trial_config.items()}
    # Label first: the UI cuts long names, and the Tune id is in the ckd.trial_id tag anyway.
    run_name = f"{label} (#{trial_id.rsplit('_', 1)[-1]})"[:250]
    factory = TrialReporterFactory(tracking_uri=context.tracking_uri, experiment=context.experiment,
                                   run_name=run_name, tags=tags, extra_params=params)
    use_gpu = context.gpus_per_worker > 0
    per_worker = {"CPU": context.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = context.gpus_per_worker
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"spec": spec.to_dict(), "reporter": factory},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=context.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=trial_id, storage_path=str(Path(context.sweep_dir) / "train"),
                             failure_config=FailureConfig(max_failures=0),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()

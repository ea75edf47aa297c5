"""One trial of a sweep: a Tune function that fits a Ray Train `TorchTrainer` of DeepSpeed workers.

The trial's job writes into `<sweep>/trials/<trial id>/` and logs to its own MLflow child run, whose
id is kept there, so a trial retried after a failure (or restored after the driver was killed)
continues the same run from its last DeepSpeed checkpoint instead of starting a second one.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobs.reporting import MlflowReporter, Reporter


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


def trial_job(sweep_dir: str, trial_config: Mapping[str, Any], trial_id: str) -> dict[str, Any]:
    """The trial's resolved job mapping: the grid's base job with the trial's values, its own output dir
    and the sweep's MLflow store."""
    from orchestrator.grid import GridSpec
    from orchestrator.state import SweepDir

    sweep = SweepDir(sweep_dir)
    record = sweep.sweep()
    grid = GridSpec.from_mapping(record["grid"], base_dir=Path(record["grid_file"]).parent, file=record["grid_file"])
    job = grid.job_mapping_for(dict(trial_config))
    job["output"] = {"dir": str(sweep.trial_dir(trial_id)),
                     "mlflow": {"tracking_uri": grid.tracking_uri(), "experiment": grid.mlflow.experiment,
                                "log_model": True}}
    return job


def run_trial(trial_config: dict[str, Any], *, sweep_dir: str) -> None:
    """The Tune function of a trial (wrapped with `tune.with_parameters(run_trial, sweep_dir=...)`)."""
    import ray.tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.distill import worker_loop
    from jobs.spec import JobSpec
    from orchestrator.grid import GridSpec, trial_label, trial_value_label
    from orchestrator.state import SweepDir

    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    sweep = SweepDir(sweep_dir)
    record = sweep.sweep()
    grid = GridSpec.from_mapping(record["grid"], base_dir=Path(record["grid_file"]).parent, file=record["grid_file"])
    job = trial_job(sweep_dir, trial_config, trial_id)
    spec = JobSpec.from_mapping(job, base_dir=grid.base_dir)
    parent_run_id = sweep.state().get("parent_run_id")
    label = trial_label(trial_config)
    tags = {"ckd.sweep_id": sweep.sweep_id, "ckd.trial_id": trial_id, "ckd.role": "trial",
            "ckd.trial_label": label, "mlflow.source.name": "ckd-orchestrate trial",
            "ckd.trial_config": json.dumps(trial_config, sort_keys=True, default=str)[:5000]}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    # The sweep axes as short readable columns (the full values are in the tag above and in the params).
    params = {f"trial.{key}": trial_value_label(key, value) for key, value in trial_config.items()}
    # Label first: the UI cuts long names, and the Tune id is in the ckd.trial_id tag anyway.
    run_name = f"{label} (#{trial_id.rsplit('_', 1)[-1]})"[:250]
    factory = TrialReporterFactory(tracking_uri=grid.tracking_uri(), experiment=grid.mlflow.experiment,
                                   run_name=run_name, tags=tags, extra_params=params)
    resources = grid.sweep.resources
    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"spec": spec.to_dict(), "reporter": factory},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=trial_id, storage_path=str(sweep.path / "train"),
                             failure_config=FailureConfig(max_failures=0),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()

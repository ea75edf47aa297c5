"""Where a job's results go. One small interface, two implementations: MLflow for `ckd-orchestrate run`
(and for a sweep's child runs), and Ray (`ray.train.report`, in orchestrator.trial) which wraps it.

Every rank calls every method (Ray needs all workers to report); implementations act on the main
rank only where that is what they need.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobs.storage import redact_uri

log = logging.getLogger(__name__)


class Reporter:
    """Does nothing; the base of the others, and what non-main ranks of a plain job use."""

    def start(self, spec: Any, *, resumed: bool) -> None: ...

    def train_step(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def evaluated(self, step: int, metrics: Mapping[str, float], *, checkpoint: Path | None) -> None: ...

    def finish(self, summary: Mapping[str, float], student_dir: Path) -> None: ...

    def already_finished(self, last_evaluation: Mapping[str, float]) -> None:
        """The job was started again after it had finished (e.g. a restored sweep): nothing was trained."""

    def failed(self, error: BaseException) -> None: ...


class MlflowReporter(Reporter):
    """Logs one job to one MLflow run: params (the flattened spec), the resolved spec and git commit,
    every training scalar, every evaluation, and at the end the best student as a transformers model
    with its size and latency.

    The run id is kept in `<output dir>/mlflow_run_id`, so a resumed job continues its own run.
    """

    def __init__(self, spec: Any, *, is_main: bool, tracking_uri: str | None = None, experiment: str | None = None,
                 run_name: str | None = None, tags: Mapping[str, str] | None = None,
                 extra_params: Mapping[str, str] | None = None) -> None:
        self.spec = spec
        self.is_main = is_main
        self.tracking_uri = tracking_uri or spec.output.tracking_uri()
        self.experiment = experiment or spec.output.mlflow.experiment
        self.run_name = run_name or spec.output.mlflow.run_name or Path(spec.output.dir).name
        self.tags = dict(tags or {})
        self.extra_params = dict(extra_params or {})
        self.run_id: str | None = None

    def start(self, spec: Any, *, resumed: bool) -> None:
        if not self.is_main:
            return
        import mlflow

        from jobs import tracking

        tracking.use_tracking_store(self.tracking_uri)
        out = Path(spec.output.dir)
        commit = tracking.git_commit(Path(__file__).resolve().parent.parent)
        tags = {"ckd.task": spec.task.task_name, "ckd.teacher": spec.teacher.source, **self.tags}
        if commit:
            tags["ckd.git_commit"] = commit
        self.run_id = tracking.start_or_resume_run(self.experiment, self.run_name, tags, out / "mlflow_run_id")
        tracking.log_params_batched(None, self.run_id, {**spec.flat_params(), **self.extra_params})
        if not resumed:
            client = mlflow.MlflowClient()
            client.log_text(self.run_id, json.dumps(spec.to_dict(redact=True), indent=1), "job.resolved.json")
        log.info("MLflow run %s in experiment %r at %s", self.run_id, self.experiment, redact_uri(self.tracking_uri))

    def train_step(self, step: int, scalars: Mapping[str, float]) -> None:
        if self.is_main and self.run_id:
            from jobs import tracking

            tracking.log_metrics_at(self.run_id, dict(scalars), step)

    def evaluated(self, step: int, metrics: Mapping[str, float], *, checkpoint: Path | None) -> None:
        if self.is_main and self.run_id:
            from jobs import tracking

            tracking.log_metrics_at(self.run_id, dict(metrics), step)

    def finish(self, summary: Mapping[str, float], student_dir: Path) -> None:
        if not (self.is_main and self.run_id):
            return
        import mlflow

        from jobs import tracking

        tracking.log_metrics_at(self.run_id, dict(summary), int(summary.get("train/steps", 0)))
        client = mlflow.MlflowClient()
        metrics_file = Path(self.spec.output.dir) / "metrics.json"
        if metrics_file.is_file():
            client.log_artifact(self.run_id, str(metrics_file))
        if self.spec.output.mlflow.log_model:
            tracking.log_student(self.run_id, student_dir)
        client.set_terminated(self.run_id, "FINISHED")

    def failed(self, error: BaseException) -> None:
        if self.is_main and self.run_id:
            import mlflow

            client = mlflow.MlflowClient()
            client.set_tag(self.run_id, "ckd.error", f"{type(error).__name__}: {error}"[:5000])
            client.set_terminated(self.run_id, "FAILED")

"""MLflow helpers shared by a single job (`ckd-orchestrate run`) and the sweep's trials.

Everything goes through an explicit ``run_id`` and an ``MlflowClient`` rather than MLflow's "active run"
(a thread-local of the fluent API), so the same calls work in the job's main process, in a Ray Train
worker and in a Tune trial thread. The store is the one of ``mlflow.get_tracking_uri()`` unless a client
is passed; set it once with ``use_tracking_store(resolve_tracking_uri(...))`` (that also exports
``MLFLOW_TRACKING_URI`` to child processes, and creates a new SQLite store safely).

Layout written (the sweep's registry and reports read it back): params flattened (``JobSpec.flat_params``),
metrics per evaluation with ``step`` = optimizer step, and the best student as a transformers-flavour
LoggedModel named "student" linked to the run.

Offline: nothing here contacts the Hugging Face Hub. ``log_student`` loads the export directory with
``local_files_only`` and passes explicit pip requirements, so MLflow neither infers requirements in a
subprocess nor asks for packages that are not installed (its default list names torchvision).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from jobs.storage import file_lock, require_connectable, sqlite_path, tracking_uri_or_default, write_text_atomic

__all__ = [
    "MAX_METRICS_PER_BATCH", "MAX_PARAMS_PER_BATCH", "ParamConflictError", "STUDENT_MODEL_NAME",
    "default_artifact_location", "ensure_experiment", "finish_run", "git_commit", "log_metrics_at", "log_params_batched",
    "log_student", "prepare_store", "resolve_tracking_uri", "start_or_resume_run", "student_pip_requirements",
    "use_tracking_store",
]  # fmt: skip

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for params in one log_batch call
MAX_METRICS_PER_BATCH = 1000  # and for metrics
STUDENT_MODEL_NAME = "student"  # the LoggedModel name of a job's best student, as the registry looks it up
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


class ParamConflictError(ValueError):
    """A param is already logged on the run with another value (MLflow params are write-once)."""

    def __init__(self, run_id: str, key: str, old: str, new: str) -> None:
        self.run_id, self.key, self.old, self.new = run_id, key, old, new
        super().__init__(
            f"MLflow param {key!r} of run {run_id} is already {_short(old)!r}; cannot change it to "
            f"{_short(new)!r} (a resumed job must use the same configuration; start a new run to change it)"
        )


def _short(value: str, limit: int = 200) -> str:
    return value if len(value) <= limit else value[:limit] + f"... ({len(value)} chars)"


def _client(client: MlflowClient | None) -> MlflowClient:
    return client if client is not None else MlflowClient()


# --------------------------------------------------------------------------------------------- store


def resolve_tracking_uri(explicit: str | None, default_sqlite_path: str | os.PathLike) -> str:
    """The tracking URI a job or sweep uses.

    ``explicit`` (the spec's / grid's ``mlflow.tracking_uri``), else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<absolute default_sqlite_path>``. A bare path ending in .db/.sqlite is taken as a SQLite
    file. For SQLite URIs the database's parent directory is created, so the first call of a fresh
    machine works.
    """
    uri = tracking_uri_or_default(explicit, os.environ, Path(default_sqlite_path).expanduser().resolve())
    if "://" not in uri and Path(uri).suffix in _SQLITE_SUFFIXES:
        uri = f"sqlite:///{Path(uri).expanduser().resolve()}"
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return uri


_prepared_stores: set[str] = set()


def prepare_store(tracking_uri: str) -> None:
    """Open the store at ``tracking_uri`` once in this process; a SQLite database's tables are created under
    a lock beside it (``.<name>.lock``).

    MLflow creates and migrates a new database's tables in whichever process opens it first, and two
    processes doing that at once (the drivers of two sweeps submitted together against a fresh store)
    break each other's migration ("duplicate column name: step", "table _alembic_tmp_metrics already
    exists"). MLflow keeps the opened store for the process, so later clients on this URI reuse it.
    An existing database in a directory this user cannot write (someone else's store, read for ``pull``)
    is opened without the lock: nobody here can be creating it.
    """
    if tracking_uri in _prepared_stores:
        return
    require_connectable(tracking_uri)  # a stored copy without its credentials: say what to export
    db = sqlite_path(tracking_uri)
    if db is None or (db.is_file() and not os.access(db.parent, os.W_OK)):
        MlflowClient(tracking_uri)
    else:
        with file_lock(db.with_name(f".{db.name}.lock")):
            MlflowClient(tracking_uri)
    _prepared_stores.add(tracking_uri)


def use_tracking_store(tracking_uri: str) -> None:
    """``prepare_store`` and make ``tracking_uri`` MLflow's URI for this process."""
    prepare_store(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)


def git_commit(path: str | os.PathLike = ".") -> str | None:
    """HEAD of the git checkout containing ``path``, with ``+dirty`` when tracked files have changes.

    None when git is missing, ``path`` is not in a work tree, or the repository has no commit yet.
    Untracked files do not count as dirty (sweep outputs often live inside the checkout).
    """
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", os.fspath(path), *args], capture_output=True, text=True,
                                 timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--verify", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit + "+dirty" if status else commit


# --------------------------------------------------------------------------------------------- runs


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: beside a SQLite database, ``<db dir>/mlartifacts/<name>``.

    MLflow's own default for a database store is ``./mlruns`` relative to the working directory of
    whichever process creates the experiment (a Ray worker's, the user's shell's), so artifacts of one
    store would scatter. None for other stores: a tracking server's ``--artifacts-destination`` applies.
    """
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (db.parent / "mlartifacts" / slug).as_uri()


def ensure_experiment(name: str, *, artifact_location: str | None = None,
                      client: MlflowClient | None = None) -> str:
    """The id of experiment ``name``, created when missing (artifacts at ``artifact_location``, default
    ``default_artifact_location``). Safe when several processes create it at once.

    Raises:
        MlflowException: the experiment exists but is deleted (the message says how to restore it).
    """
    client = _client(client)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = artifact_location or default_artifact_location(client.tracking_uri, name)
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # another process created it between the two calls
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise MlflowException(f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore "
                              f"--experiment-id {experiment.experiment_id}) or use another name")
    return experiment.experiment_id


def start_or_resume_run(experiment: str, run_name: str | None, tags: Mapping[str, str] | None,
                        run_id_file: str | os.PathLike, *, client: MlflowClient | None = None) -> str:
    """The MLflow run of a job: the one recorded in ``run_id_file`` when it still exists, else a new one.

    A resumed job (a restarted trial, a job run again after a kill) thus continues its own run instead of
    creating a second: its status goes back to RUNNING and ``tags`` are set again. A new run is created
    in ``experiment`` (created when missing, see ``ensure_experiment``) with ``run_name`` and ``tags`` (``mlflow.parentRunId`` in
    ``tags`` makes it a child run), and its id written atomically to ``run_id_file``.
    A recorded run that was deleted, or that belongs to another experiment, is not reused.
    """
    client = _client(client)
    experiment_id = ensure_experiment(experiment, client=client)
    tags = {k: str(v) for k, v in (tags or {}).items()}
    path = Path(run_id_file)
    recorded = path.read_text().strip() if path.is_file() else ""
    if recorded:
        try:
            run = client.get_run(recorded)
        except MlflowException:
            run = None
        if run is not None and run.info.lifecycle_stage == "active" and run.info.experiment_id == experiment_id:
            if run.info.status != "RUNNING":
                client.update_run(recorded, status="RUNNING")
            for key, value in tags.items():
                if run.data.tags.get(key) != value:
                    client.set_tag(recorded, key, value)
            return recorded
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    write_text_atomic(path, run.info.run_id + "\n")
    return run.info.run_id


def finish_run(run_id: str, status: str = "FINISHED", *, client: MlflowClient | None = None) -> None:
    """End a run: FINISHED, FAILED or KILLED (sets the end time)."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
    _client(client).set_terminated(run_id, status=status)


# --------------------------------------------------------------------------------------------- params, metrics


def log_params_batched(client: MlflowClient | None, run_id: str, params: Mapping[str, Any]) -> int:
    """Log ``params`` (values as strings) in batches of at most ``MAX_PARAMS_PER_BATCH``.

    Params the run already has with the same value are skipped, so a resumed run can log its params
    again. Returns how many were newly logged.

    Raises:
        ParamConflictError: a param already logged with another value (names the key, both values).
    """
    client = _client(client)
    existing = client.get_run(run_id).data.params
    new: list[Param] = []
    for key, value in params.items():
        value = str(value)
        if key in existing:
            if existing[key] != value:
                raise ParamConflictError(run_id, key, existing[key], value)
            continue
        new.append(Param(key, value))
    for start in range(0, len(new), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=new[start:start + MAX_PARAMS_PER_BATCH], synchronous=True)
    return len(new)


def log_metrics_at(run_id: str, metrics: Mapping[str, float], step: int, *,
                   client: MlflowClient | None = None, timestamp_ms: int | None = None) -> None:
    """Log ``metrics`` at ``step`` (one timestamp for all), in batches of ``MAX_METRICS_PER_BATCH``."""
    client = _client(client)
    timestamp = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
    batch = [Metric(key, float(value), timestamp, int(step)) for key, value in metrics.items()]
    for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch[start:start + MAX_METRICS_PER_BATCH], synchronous=True)


# --------------------------------------------------------------------------------------------- the student model


def student_pip_requirements() -> list[str]:
    """Pinned requirements recorded with a logged student: transformers, torch, safetensors."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for package in ("transformers", "torch", "safetensors"):
        try:
            reqs.append(f"{package}=={version(package).split('+')[0]}")  # "2.13.0+cpu" -> "2.13.0"
        except PackageNotFoundError:
            reqs.append(package)
    return reqs


def log_student(run_id: str, export_dir: str | os.PathLike, *, task: str = "text-classification",
                name: str = STUDENT_MODEL_NAME, step: int | None = None,
                tags: Mapping[str, str] | None = None) -> str:
    """Log a Hugging Face export directory (``jobs.models.export_student``) as a transformers-flavour model.

    The model becomes an MLflow 3 LoggedModel named ``name`` whose source run is ``run_id`` (a run
    output); the metrics the run logged at ``step`` (e.g. the evaluation of the exported checkpoint)
    are linked to it. Works offline: the directory is loaded locally and handed to MLflow as
    ``{"model", "tokenizer"}`` (MLflow 3.17's local-checkpoint path fails with transformers 5). The
    LoggedModel is created in the run's experiment and carries the run's params and ``tags``.

    In the stored artifacts the weights and config are under ``model/`` and the tokenizer under
    ``components/tokenizer/`` (``orchestrator.registry.pull`` puts them back together).

    Uses the global tracking URI (``mlflow.set_tracking_uri``), which MLflow's ``log_model`` reads.

    Returns:
        The model URI ``models:/<model_id>``, accepted by ``mlflow.register_model`` and loaders.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(export_dir).resolve()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face export (no config.json)")
    # An absolute local name_or_path: MLflow looks a model card and license up on the Hub by that name,
    # and a local path is rejected by huggingface_hub's repo-id check before any request is made.
    model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    run = MlflowClient().get_run(run_id)
    # Created here, in the run's experiment: log_model on its own would put the LoggedModel in the
    # *active* experiment (mlflow.set_experiment / $MLFLOW_EXPERIMENT_ID, else "Default"), not the run's.
    logged = mlflow.initialize_logged_model(
        name=name, source_run_id=run_id, experiment_id=run.info.experiment_id,
        params=dict(run.data.params), tags={k: str(v) for k, v in (tags or {}).items()} or None)
    flavour_logger = logging.getLogger("mlflow.transformers")
    flavour_logger.addFilter(_drop_hub_card_warnings)
    try:
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, name=name, task=task, run_id=run_id,
            model_id=logged.model_id, pip_requirements=student_pip_requirements(),
            step=0 if step is None else int(step),
        )
    finally:
        flavour_logger.removeFilter(_drop_hub_card_warnings)
    return info.model_uri


def _drop_hub_card_warnings(record: logging.LogRecord) -> bool:
    """Drop the flavour's two warnings about finding no Hub model card / license for a local student."""
    message = record.getMessage()
    return not message.startswith(("The model card could not be retrieved from the hub",
                                   "Unable to find license information for this model"))

"""What MLflow records of a sweep, and filling the submitting machine's state.json from it.

MLflow is the system of record every machine of a sweep shares. The driver tags the sweep's parent run
(`SWEEP_ID_TAG`, `ROLE_TAG` = "sweep") and the champion's registered model version (`SWEEP_ID_TAG`,
`TRIAL_ID_TAG`, `METRIC_VALUE_TAG`), and writes the champion record (`champion_record`) into its
state.json. A driver on a cluster without the submitting machine's file system (a remote Ray cluster, a
Kubernetes PVC: a backend with `shares_sweep_dir = False`) writes *its* copy of the sweep directory;
`sync_from_mlflow` then fills this machine's state.json from the same tags, building the champion record
the same way.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping
from typing import Any

from cluster.base import SweepStatus
from jobs.storage import is_redacted, redact_uri, require_connectable, sqlite_path, unredact_uri
from orchestrator.state import SweepDir

__all__ = [
    "GIT_COMMIT_TAG", "METRIC_VALUE_TAG", "ROLE_SWEEP", "ROLE_TAG", "ROLE_TRIAL", "SWEEP_DIR_TAG", "SWEEP_ID_TAG",
    "TRIAL_ID_TAG", "champion_record", "server_problem", "sync_from_mlflow",
]  # fmt: skip

# Tags the driver and the trials set (the MLflow layout users and tests read: never rename them).
SWEEP_ID_TAG = "ckd.sweep_id"
ROLE_TAG = "ckd.role"
ROLE_SWEEP, ROLE_TRIAL = "sweep", "trial"
SWEEP_DIR_TAG = "ckd.sweep_dir"
GIT_COMMIT_TAG = "ckd.git_commit"
TRIAL_ID_TAG = "ckd.trial_id"
METRIC_VALUE_TAG = "ckd.metric_value"

# How long `status` waits for an MLflow server: its client retries an unreachable one for minutes.
_HEALTH_TIMEOUT_S = 5


def champion_record(version: Any, *, model: str, alias: str, metric: str) -> dict[str, Any]:
    """state.json's "champion": the registered model version `version` (an MLflow `ModelVersion`) of the
    sweep's best trial, registered as `model` with `alias`, which won on `metric`."""
    tags = version.tags or {}
    return {"model": model, "version": version.version, "alias": alias, "uri": f"models:/{model}@{alias}",
            "run_id": version.run_id, "trial_id": tags.get(TRIAL_ID_TAG), "metric": metric,
            "value": float(tags.get(METRIC_VALUE_TAG, "nan"))}


def server_problem(tracking_uri: str) -> str | None:
    """Why the MLflow server at `tracking_uri` (http or https) does not answer its /health, or None when it
    does (or the store is not a server)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=_HEALTH_TIMEOUT_S)
    except Exception as err:
        return str(err)
    return None


def sync_from_mlflow(sweep: SweepDir, tracking_uri: str) -> dict[str, Any]:
    """Copy what MLflow knows of the sweep into state.json where it is missing: the parent run id, and once
    the parent run has FINISHED, the champion and the status "finished". Returns the (new) state.

    The experiment, model name, alias and metric come from the sweep's record (sweep.json). Only fills what
    is missing or stale: with a shared sweep directory the driver has written it already, and nothing
    changes. An unreachable MLflow store leaves the state as it is.
    """
    import mlflow

    state = sweep.state()
    if state.get("parent_run_id") and SweepStatus(state.get("status", SweepStatus.PENDING)).is_terminal:
        return state
    tracking_uri = unredact_uri(tracking_uri)  # state.json keeps it without credentials
    if is_redacted(tracking_uri) or not _answers(tracking_uri):
        return state
    names = _mlflow_names(sweep.record()["grid"])
    client = mlflow.MlflowClient(tracking_uri)
    try:
        parent = _parent_run(client, names["experiment"], sweep.sweep_id)
        if parent is None:
            return state
        changes: dict[str, Any] = {}
        if state.get("parent_run_id") != parent.info.run_id:
            changes.update(parent_run_id=parent.info.run_id, tracking_uri=redact_uri(tracking_uri),
                           experiment=names["experiment"])
        if parent.info.status == "FINISHED" and state.get("status") != SweepStatus.FINISHED:
            champion = _champion(client, names, sweep.sweep_id)
            if champion is not None:
                changes.update(status=SweepStatus.FINISHED, champion=champion, error=None)
    except Exception:  # MLflow down or unreachable from here: status shows what state.json has
        return state
    return sweep.update_state(**changes) if changes else state


def stored_tracking_uri(state: Mapping[str, Any]) -> str:
    """The MLflow store to connect to for a sweep's state.json: its `tracking_uri` (kept without credentials),
    or $MLFLOW_TRACKING_URI when that is the same URI with its credentials.

    Raises:
        ValueError: the stored URI had credentials and no matching $MLFLOW_TRACKING_URI is set (the message
            says what to export), or the state has no tracking URI.
    """
    stored = state.get("tracking_uri")
    if not stored:
        raise ValueError("the sweep's state.json names no MLflow tracking URI (has its driver started?)")
    return require_connectable(unredact_uri(stored))


def _mlflow_names(grid: Mapping[str, Any]) -> dict[str, str]:
    """The names MLflow knows the sweep by, from the resolved grid in sweep.json (every default filled in)."""
    mlflow_block, sweep_block = grid.get("mlflow") or {}, grid.get("sweep") or {}
    return {"experiment": mlflow_block["experiment"], "model": mlflow_block["registered_model"],
            "alias": mlflow_block["alias"], "metric": sweep_block["metric"]}


def _answers(tracking_uri: str) -> bool:
    """Whether the store can be read now: an MLflow server that answers at once (`status` must not hang on
    an in-cluster address this machine cannot reach), or a SQLite file the driver has created (opening a
    missing one would create its tables here, racing the driver that creates them)."""
    if tracking_uri.startswith("sqlite:///"):
        db = sqlite_path(tracking_uri)
        return db is not None and db.is_file()
    return server_problem(tracking_uri) is None


def _parent_run(client: Any, experiment: str, sweep_id: str) -> Any:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], max_results=2,
                              filter_string=f"tags.`{SWEEP_ID_TAG}` = '{sweep_id}' AND tags.`{ROLE_TAG}` = "
                                            f"'{ROLE_SWEEP}'")
    return runs[0] if runs else None


def _champion(client: Any, names: Mapping[str, str], sweep_id: str) -> dict[str, Any] | None:
    """The champion record the driver writes, rebuilt from the sweep's newest registered version."""
    versions = [v for v in client.search_model_versions(f"name = '{names['model']}'")
                if (v.tags or {}).get(SWEEP_ID_TAG) == sweep_id]
    if not versions:
        return None
    version = max(versions, key=lambda v: int(v.version))
    return champion_record(version, model=names["model"], alias=names["alias"], metric=names["metric"])

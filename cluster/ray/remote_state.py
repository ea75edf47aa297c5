"""Fill the submitting machine's state.json from MLflow, for a driver that wrote its own on a cluster.

A driver on a cluster without the submitting machine's file system records its parent run, its champion
and its end in *its* copy of the sweep directory. MLflow is the system of record both sides share: the
parent run carries the tag ckd.sweep_id, and the champion's registered model version carries it too.
"""

from __future__ import annotations

from typing import Any

from jobs.storage import sqlite_path
from orchestrator.state import SweepDir

__all__ = ["sync_from_mlflow"]


def sync_from_mlflow(sweep: SweepDir, grid: Any, tracking_uri: str) -> dict[str, Any]:
    """Copy what MLflow knows of the sweep into state.json where it is missing: the parent run id, and once
    the parent run has FINISHED, the champion and the status "finished". Returns the (new) state.

    Only fills what is missing or stale: with a shared sweep directory the driver has written it already,
    and nothing changes. An unreachable MLflow store leaves the state as it is.
    """
    import mlflow

    state = sweep.state()
    if state.get("parent_run_id") and state.get("status") in ("finished", "failed", "cancelled"):
        return state
    if not _answers(tracking_uri):
        return state
    client = mlflow.MlflowClient(tracking_uri)
    try:
        parent = _parent_run(client, grid.mlflow.experiment, sweep.sweep_id)
        if parent is None:
            return state
        changes: dict[str, Any] = {}
        if state.get("parent_run_id") != parent.info.run_id:
            changes.update(parent_run_id=parent.info.run_id, tracking_uri=tracking_uri,
                           experiment=grid.mlflow.experiment)
        if parent.info.status == "FINISHED" and state.get("status") != "finished":
            champion = _champion(client, grid, sweep.sweep_id)
            if champion is not None:
                changes.update(status="finished", champion=champion, error=None)
    except Exception:  # MLflow down or unreachable from here: status shows what state.json has
        return state
    return sweep.update_state(**changes) if changes else state


def _answers(tracking_uri: str) -> bool:
    """Whether the store can be read now: an MLflow server that answers at once (its client retries an
    unreachable one for minutes, and `status` must not hang on an in-cluster address this machine cannot
    reach), or a SQLite file the driver has created (opening a missing one would create its tables here,
    racing the driver that creates them)."""
    if tracking_uri.startswith("sqlite:///"):
        db = sqlite_path(tracking_uri)
        return db is not None and db.is_file()
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    import urllib.request

    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=5)
    except Exception:
        return False
    return True


def _parent_run(client: Any, experiment: str, sweep_id: str) -> Any:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], max_results=2,
                              filter_string=f"tags.`ckd.sweep_id` = '{sweep_id}' AND tags.`ckd.role` = 'sweep'")
    return runs[0] if runs else None


def _champion(client: Any, grid: Any, sweep_id: str) -> dict[str, Any] | None:
    """The champion record the driver writes, rebuilt from the sweep's newest registered version."""
    model = grid.mlflow.registered_model
    versions = [v for v in client.search_model_versions(f"name = '{model}'")
                if (v.tags or {}).get("ckd.sweep_id") == sweep_id]
    if not versions:
        return None
    version = max(versions, key=lambda v: int(v.version))
    tags = version.tags or {}
    return {"model": model, "version": version.version, "alias": grid.mlflow.alias,
            "uri": f"models:/{model}@{grid.mlflow.alias}", "run_id": version.run_id,
            "trial_id": tags.get("ckd.trial_id"), "metric": grid.metric_name,
            "value": float(tags.get("ckd.metric_value", "nan"))}

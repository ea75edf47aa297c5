"""`Sweeps` for `cluster: {backend: ray, address: http://HEAD:8265}`: the sweep driver as a Ray job.

What travels with the job (its runtime environment):

- the project's packages (`py_modules`: ckd, jobs, orchestrator, cluster), so the cluster needs only
  the project's dependencies installed, not the project itself; caches and compiled files are left out
  (`excludes`, plus `cluster.excludes`);
- the sweep's record (sweep.json + grid.yaml) in $CKD_SWEEP_RECORD: the entrypoint
  `python -m orchestrator.driver <dir> --bootstrap-env CKD_SWEEP_RECORD` creates the sweep directory from
  it when the cluster does not see the submitting machine's, and continues it when it does;
- MLFLOW_TRACKING_URI (the grid's store, as resolved here), CKD_CACHE_DIR, and the dashboard address
  for the workers (CKD_RAY_DASHBOARD_URL, read by the driver's `init_ray`).

The Ray submission id is the sweep id (`<sweep id>-r<N>` for the N-th submission by `resume`), so a sweep
is submitted once per attempt; `describe`, `driver_log` and `cancel` find the latest job by the id recorded
in state.json.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

from cluster.ray.connection import RayBackendError, connect, explain
from cluster.ray.remote_state import sync_from_mlflow
from orchestrator.state import SweepDir

__all__ = ["EXCLUDES", "PACKAGES", "Sweeps", "plan_problems", "remote_sweep_dir"]

# The project's top-level packages: what the driver and the trials import.
PACKAGES = ("ckd", "jobs", "orchestrator", "cluster")
# Never uploaded: caches and build output (gitignore syntax, relative to each package).
EXCLUDES = ["__pycache__/", "*.pyc", "*.so", ".pytest_cache/", ".hypothesis/", ".ruff_cache/", "*.egg-info/",
            "mlruns/", "*.db"]
# Seconds Ray lets the driver unwind after `stop_job`'s SIGTERM (default 3) before it kills it: enough for
# Tune to stop its trials and the driver to mark the MLflow parent run KILLED.
STOP_GRACE_S = 30
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def remote_sweep_dir(sweep: SweepDir, spec: Any) -> str:
    """The sweep directory as the cluster sees it: under `cluster.sweep_root`, else the same path as here."""
    return f"{spec.sweep_root.rstrip('/')}/{sweep.sweep_id}" if spec.sweep_root else str(sweep.path)


def plan_problems(grid: Any) -> list[str]:
    """What stops a `ray` sweep before anything is queued: an unreachable or refusing dashboard."""
    try:
        connect(grid.cluster.address)
    except RayBackendError as err:
        return [str(err)]
    return []


def _package_dirs() -> list[str]:
    import importlib

    return [str(Path(importlib.import_module(name).__file__).parent) for name in PACKAGES]


def _recorded_job(sweep: SweepDir) -> tuple[str, str]:
    """(submission id, dashboard address) from state.json.

    Raises:
        LookupError: the sweep was not submitted to a Ray cluster (or its state.json lost the record).
    """
    backend = sweep.state().get("backend") or {}
    if backend.get("backend") != "ray" or not backend.get("job_id") or not backend.get("address"):
        raise LookupError(f"{sweep.path / 'state.json'}: no Ray job recorded under 'backend' (expected "
                          f"{{'backend': 'ray', 'job_id': ..., 'address': ...}}, found {backend!r})")
    return str(backend["job_id"]), str(backend["address"])


class Sweeps:
    """The `ray` backend: submit, describe, driver_log, cancel (see orchestrator.submit)."""

    def submit(self, sweep: SweepDir, grid: Any) -> str:
        """Submit the sweep driver as a Ray job whose submission id is the sweep id; return at once.

        Raises:
            RayBackendError: the cluster cannot be reached, or a job with this id exists already.
        """
        from orchestrator.driver import RECORD_ENV, sweep_record

        spec = grid.cluster
        client = connect(spec.address)
        target = remote_sweep_dir(sweep, spec)
        tracking_uri = grid.tracking_uri()
        env_vars = {
            "MLFLOW_TRACKING_URI": tracking_uri,
            "CKD_CACHE_DIR": f"{target}/cache",
            "CKD_RAY_DASHBOARD_URL": spec.address,
            RECORD_ENV: sweep_record(sweep),
            # init_ray passes its own env_vars to ray.init; Ray refuses to merge them with the job's unless told.
            "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
            "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S),
            **spec.env_vars,
        }
        runtime_env = {"py_modules": _package_dirs(), "excludes": EXCLUDES + list(spec.excludes),
                       "env_vars": env_vars}
        entrypoint = (f"python -m orchestrator.driver {shlex.quote(target)} --bootstrap-env {RECORD_ENV}")
        # A `resume` submits the driver again: each submission needs its own id (Ray keeps finished jobs).
        previous = sweep.state().get("backend") or {}
        attempt = int(previous.get("attempt", 1)) + 1 if previous.get("backend") == "ray" and previous.get("job_id") else 1
        submission_id = sweep.sweep_id if attempt == 1 else f"{sweep.sweep_id}-r{attempt}"
        try:
            job_id = client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env=runtime_env,
                                       metadata={"ckd.sweep_id": sweep.sweep_id})
        except Exception as err:
            if "already exists" in str(err):
                raise RayBackendError(f"a Ray job with submission id {submission_id!r} exists already on "
                                      f"{spec.address}: the sweep was submitted before (`ckd-orchestrate status "
                                      f"{sweep.sweep_id}`)") from None
            raise RayBackendError(f"submitting sweep {sweep.sweep_id} to {spec.address}: "
                                  f"{explain(err)}") from None
        sweep.update_state(backend={"backend": "ray", "job_id": job_id, "attempt": attempt, "address": spec.address,
                                    "sweep_dir": target},
                           tracking_uri=tracking_uri, experiment=grid.mlflow.experiment)
        return job_id

    def describe(self, sweep: SweepDir) -> tuple[str, str | None]:
        """One line on the Ray job, and "failed"/"cancelled" when it ended so while state.json, which a
        driver on another file system cannot update, still says pending/running.

        With such a driver, the parent run id and, once it finished, the champion and the status are
        copied into state.json from MLflow (`sync_from_mlflow`), and "running" from Ray.

        Raises:
            LookupError: no Ray job recorded in state.json.
        """
        from orchestrator.driver import load_grid_of

        job_id, address = _recorded_job(sweep)
        state = sweep.state()
        try:
            info = connect(address).get_job_info(job_id)
        except RayBackendError as err:
            return f"Ray job {job_id}: {err}", None
        except Exception as err:  # RuntimeError "does not exist": removed from the cluster's job table
            return f"Ray job {job_id} on {address}: {explain(err)}", None
        status = str(getattr(info.status, "value", info.status))
        line = f"Ray job {job_id} on {address}: {status}{_elapsed(info)}"
        if status in ("FAILED", "STOPPED") and info.message:
            line += f" ({' '.join(info.message.split())[:300]})"
        if state.get("tracking_uri"):
            state = sync_from_mlflow(sweep, load_grid_of(sweep), state["tracking_uri"])
        if status == "RUNNING" and state.get("status") == "pending":
            state = sweep.update_state(status="running")  # a driver on another file system cannot say so
        if state.get("status") in ("pending", "running"):
            implied = {"FAILED": "failed", "STOPPED": "cancelled"}.get(status)
            return line, implied
        return line, None

    def driver_log(self, sweep: SweepDir, tail: int | None) -> str | None:
        """The Ray job's output (the driver's log), the last `tail` lines when given."""
        job_id, address = _recorded_job(sweep)
        client = connect(address)
        try:
            text = client.get_job_logs(job_id)
        except Exception as err:
            raise RayBackendError(f"logs of Ray job {job_id}: {explain(err)}") from None
        if tail:
            text = "\n".join(text.splitlines()[-tail:]) + "\n"
        return text

    def cancel(self, sweep: SweepDir, timeout_s: float) -> None:
        """Stop the Ray job (SIGTERM to the driver, which stops its trials) and wait until Ray says it has
        ended, up to `timeout_s`.

        Raises:
            RayBackendError: the cluster cannot be reached, or the job is still running after `timeout_s`.
        """
        job_id, address = _recorded_job(sweep)
        client = connect(address)
        try:
            client.stop_job(job_id)
        except Exception as err:
            if "does not exist" in str(err):
                return
            raise RayBackendError(f"stopping Ray job {job_id}: {explain(err)}") from None
        deadline = time.monotonic() + timeout_s
        while True:
            status = str(getattr(client.get_job_status(job_id), "value", ""))
            if status in _TERMINAL:
                return
            if time.monotonic() > deadline:
                raise RayBackendError(f"Ray job {job_id} is still {status} {timeout_s:g} s after stop_job")
            time.sleep(1)


def _elapsed(info: Any) -> str:
    """" (elapsed HH:MM:SS)" from the job's start (and end) times in ms, or ""."""
    if not info.start_time:
        return ""
    end = info.end_time or time.time() * 1000
    seconds = max(0, int((end - info.start_time) / 1000))
    return f" (elapsed {seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d})"

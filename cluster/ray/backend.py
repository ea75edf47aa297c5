"""`RayBackend` for `cluster: {backend: ray, address: http://HEAD:8265}`: the sweep driver as a Ray job.

What travels with the job (its runtime environment):

- the project's packages (`py_modules`: `launch.packages`), so the cluster needs only the project's
  dependencies installed, not the project itself; caches and compiled files are left out (`excludes`,
  plus `cluster.excludes`);
- the driver's environment as the orchestrator built it (`launch.env`: the MLflow store as resolved here,
  the cache directory, the sweep's record that lets the driver create the sweep directory when the cluster
  does not see the submitting machine's, and continue it when it does), plus the dashboard address for the
  workers (CKD_RAY_DASHBOARD_URL, read by the driver's `init_ray`) and `cluster.env_vars`.

The Ray submission id is the sweep id (`<sweep id>-r<N>` for the N-th submission by `resume`), so a sweep
is submitted once per attempt; `status`, `logs` and `cancel` find the job by the reference `submit`
returned: {"backend": "ray", "job_id", "attempt", "address", "sweep_dir"}.
"""

from __future__ import annotations

import importlib
import shlex
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cluster.base import Backend, DriverLaunch, JobRef, JobStatus, SweepStatus, TrialShape
from cluster.ray.config import RayClusterSpec
from cluster.ray.connection import RayBackendError, connect, explain

__all__ = ["EXCLUDES", "STOP_GRACE_S", "RayBackend"]

# Never uploaded: caches and build output (gitignore syntax, relative to each package).
EXCLUDES = ["__pycache__/", "*.pyc", "*.so", ".pytest_cache/", ".hypothesis/", ".ruff_cache/", "*.egg-info/",
            "mlruns/", "*.db"]
# Seconds Ray lets the driver unwind after `stop_job`'s SIGTERM (default 3) before it kills it: enough for
# Tune to stop its trials and the driver to mark the MLflow parent run KILLED.
STOP_GRACE_S = 30
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# A Ray job's status -> the sweep status it implies (SUCCEEDED: the driver's record says how it ended).
_SWEEP_STATUS = {"PENDING": SweepStatus.PENDING, "RUNNING": SweepStatus.RUNNING, "FAILED": SweepStatus.FAILED,
                 "STOPPED": SweepStatus.CANCELLED}


class RayBackend(Backend):
    """The `ray` backend: submit, status, logs, cancel of the driver's Ray job (see the module docstring)."""

    name = "ray"
    # The cluster keeps its own copy of the sweep directory (under cluster.sweep_root, or at the same path
    # on a shared file system): the orchestrator learns the driver's progress from MLflow.
    shares_sweep_dir = False
    spec: RayClusterSpec

    def sweep_dir_for(self, sweep_id: str, local_dir: str) -> str:
        """Under `cluster.sweep_root`, else the same path as here."""
        return f"{self.spec.sweep_root.rstrip('/')}/{sweep_id}" if self.spec.sweep_root else local_dir

    def interpreter(self) -> str:
        return "python"  # the cluster's own Python, on the PATH of its job drivers

    def plan_problems(self, trial: TrialShape, launch: DriverLaunch) -> list[str]:
        """What stops a `ray` sweep before anything is queued: an unreachable or refusing dashboard."""
        try:
            connect(self.spec.address)
        except RayBackendError as err:
            return [str(err)]
        return []

    def submit(self, launch: DriverLaunch, previous: Mapping[str, Any] | None = None) -> JobRef:
        """Submit the sweep driver as a Ray job whose submission id is the sweep id; return at once.

        Raises:
            RayBackendError: the cluster cannot be reached, or a job with this id exists already.
        """
        spec = self.spec
        client = connect(spec.address)
        env_vars = {**launch.env, "CKD_RAY_DASHBOARD_URL": spec.address,
                    "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S), **spec.env_vars}
        runtime_env = {"py_modules": _package_dirs(launch.packages), "excludes": EXCLUDES + list(spec.excludes),
                       "env_vars": env_vars}
        # A `resume` submits the driver again: each submission needs its own id (Ray keeps finished jobs).
        previous = previous or {}
        attempt = int(previous.get("attempt", 1)) + 1 if previous.get("backend") == self.name and \
            previous.get("job_id") else 1
        sweep_id = launch.sweep_id
        submission_id = sweep_id if attempt == 1 else f"{sweep_id}-r{attempt}"
        try:
            job_id = client.submit_job(entrypoint=shlex.join(launch.argv), submission_id=submission_id,
                                       runtime_env=runtime_env, metadata={"ckd.sweep_id": sweep_id})
        except Exception as err:
            if "already exists" in str(err):
                raise RayBackendError(f"a Ray job with submission id {submission_id!r} exists already on "
                                      f"{spec.address}: the sweep was submitted before (`ckd-orchestrate status "
                                      f"{sweep_id}`)") from None
            raise RayBackendError(f"submitting sweep {sweep_id} to {spec.address}: {explain(err)}") from None
        return {"backend": self.name, "job_id": job_id, "attempt": attempt, "address": spec.address,
                "sweep_dir": launch.sweep_dir}

    def status(self, job: Mapping[str, Any]) -> JobStatus:
        """One line on the Ray job, and the sweep status it implies (None when Ray cannot be asked).

        Raises:
            LookupError: `job` is not a Ray job's reference.
        """
        job_id, address = _recorded_job(job)
        try:
            info = connect(address).get_job_info(job_id)
        except RayBackendError as err:
            return JobStatus(line=f"Ray job {job_id}: {err}")
        except Exception as err:  # RuntimeError "does not exist": removed from the cluster's job table
            return JobStatus(line=f"Ray job {job_id} on {address}: {explain(err)}")
        status = str(getattr(info.status, "value", info.status))
        line = f"Ray job {job_id} on {address}: {status}{_elapsed(info)}"
        if status in ("FAILED", "STOPPED") and info.message:
            line += f" ({' '.join(info.message.split())[:300]})"
        return JobStatus(line=line, state=_SWEEP_STATUS.get(status))

    def logs(self, job: Mapping[str, Any], tail: int | None) -> str | None:
        """The Ray job's output (the driver's log), the last `tail` lines when given."""
        job_id, address = _recorded_job(job)
        client = connect(address)
        try:
            text = client.get_job_logs(job_id)
        except Exception as err:
            raise RayBackendError(f"logs of Ray job {job_id}: {explain(err)}") from None
        if tail:
            text = "\n".join(text.splitlines()[-tail:]) + "\n"
        return text

    def cancel(self, job: Mapping[str, Any], timeout_s: float) -> None:
        """Stop the Ray job (SIGTERM to the driver, which stops its trials) and wait until Ray says it has
        ended, up to `timeout_s`.

        Raises:
            RayBackendError: the cluster cannot be reached, or the job is still running after `timeout_s`.
        """
        job_id, address = _recorded_job(job)
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


def _package_dirs(packages: Sequence[str]) -> list[str]:
    return [str(Path(importlib.import_module(name).__file__).parent) for name in packages]


def _recorded_job(job: Mapping[str, Any]) -> tuple[str, str]:
    """(submission id, dashboard address) of a job reference.

    Raises:
        LookupError: the sweep was not submitted to a Ray cluster (or its state.json lost the record).
    """
    if job.get("backend") != "ray" or not job.get("job_id") or not job.get("address"):
        raise LookupError(f"no Ray job recorded under 'backend' in state.json (expected {{'backend': 'ray', "
                          f"'job_id': ..., 'address': ...}}, found {dict(job)!r})")
    return str(job["job_id"]), str(job["address"])


def _elapsed(info: Any) -> str:
    """" (elapsed HH:MM:SS)" from the job's start (and end) times in ms, or ""."""
    if not info.start_time:
        return ""
    end = info.end_time or time.time() * 1000
    seconds = max(0, int((end - info.start_time) / 1000))
    return f" (elapsed {seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d})"

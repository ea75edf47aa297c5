"""The local backend: the sweep's driver runs on this machine, with Ray started in the driver's process.

Its `cluster:` block is optional (a grid with none runs here); `num_cpus` / `num_gpus` cap what that Ray
instance uses. `LocalBackend` starts the driver as a detached process (`submit --detach`, `resume
--detach`) and follows it by its pid; the job reference is {"backend": "local", "pid", "detached"}, and
the driver adds "ray_pids" (the Ray processes it started) so that `cancel` stops exactly those. A blocking
`submit` runs the driver in the CLI's own process instead (orchestrator.control), with the same reference.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from cluster.base import Backend, ClusterSpec, DriverLaunch, JobRef, JobStatus, SweepStatus, TrialShape

__all__ = ["LocalBackend", "LocalClusterSpec", "pid_alive", "stop_processes"]

# Seconds the Ray processes of a cancelled sweep get to exit after SIGTERM before they are killed.
RAY_STOP_GRACE_S = 30


class LocalClusterSpec(ClusterSpec):
    """Ray started in the submitting process; `num_cpus` / `num_gpus` cap what it uses (default: all)."""

    backend: Literal["local"] = "local"
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)


class LocalBackend(Backend):
    """The `local` backend: the sweep driver as a process of this machine (see the module docstring)."""

    name = "local"
    spec: LocalClusterSpec

    def capacity(self) -> tuple[float, float]:
        """(CPUs, GPUs) the local Ray offers trials: `num_cpus` / `num_gpus`, else what this machine has."""
        cpus = self.spec.num_cpus or os.cpu_count() or 1
        gpus = self.spec.num_gpus
        if gpus is None:
            try:
                import torch  # only for a local plan: the GPUs Ray would find here

                gpus = torch.cuda.device_count()
            except Exception:
                gpus = 0
        return float(cpus), float(gpus)

    def plan_problems(self, trial: TrialShape, launch: DriverLaunch) -> list[str]:
        """A trial that does not fit this machine (not even one at a time)."""
        cpus, gpus = self.capacity()
        fit = math.floor(cpus / trial.cpus + 1e-9)
        if trial.gpus > 0:
            fit = min(fit, math.floor(gpus / trial.gpus + 1e-9))
        if fit >= 1:
            return []
        return [f"sweep.resources: a trial needs {trial.cpus:g} CPUs and {trial.gpus:g} GPUs; this machine "
                f"offers {cpus:g} CPUs and {gpus:g} GPUs (set cluster.num_cpus to run more logical CPUs than "
                f"cores, or lower cpus_per_worker)"]

    def submit(self, launch: DriverLaunch, previous: Mapping[str, Any] | None = None) -> JobRef:
        """Start the driver detached (its own session, output appended to the sweep's logs/driver.log)."""
        log_file = Path(launch.local_dir) / "logs" / "driver.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as log:
            proc = subprocess.Popen(list(launch.argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env={**os.environ, **launch.env})
        return {"backend": self.name, "pid": proc.pid, "detached": True}

    def status(self, job: Mapping[str, Any]) -> JobStatus:
        """RUNNING while the driver's process lives; else nothing to say (the driver recorded its end, or
        it was killed and the sweep reads "running" until `resume` continues it)."""
        return JobStatus(state=SweepStatus.RUNNING) if _job_alive(job) else JobStatus()

    def logs(self, job: Mapping[str, Any], tail: int | None) -> str | None:
        return None  # the driver writes the sweep's own logs/driver.log

    def cancel(self, job: Mapping[str, Any], timeout_s: float) -> None:
        """SIGTERM the driver (with the Ray it started, when detached: its process group), SIGKILL a detached
        one still there after `timeout_s`; then stop the Ray processes the driver recorded."""
        if _job_alive(job):
            pid = int(job["pid"])
            if job.get("detached"):
                os.killpg(pid, signal.SIGTERM)  # the driver and the Ray processes it started
            else:
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _job_alive(job) and time.monotonic() < deadline:
                time.sleep(1)
            if _job_alive(job) and job.get("detached"):
                os.killpg(pid, signal.SIGKILL)
        stop_processes(job.get("ray_pids") or [])


def _job_alive(job: Mapping[str, Any]) -> bool:
    pid = job.get("pid")
    return bool(pid) and pid_alive(int(pid))


def stop_processes(pids: Iterable[int], sig: int = signal.SIGTERM, grace_s: float = RAY_STOP_GRACE_S) -> None:
    """Send `sig` to `pids` (the Ray processes a local driver started, never any other Ray on the machine),
    and SIGKILL those still alive after `grace_s` seconds."""
    pids = list(pids)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
        time.sleep(0.5)
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not: it has exited and only waits for its parent)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is gone for our purpose
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True

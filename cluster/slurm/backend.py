"""`SlurmBackend`: submit a sweep as one Slurm job through submitit, read its state, find its logs, cancel it.

The job is a submitit `SlurmExecutor` job with folder `<sweep_dir>/slurm`: `nodes` nodes, one task per node,
each running `cluster.slurm.launcher.RayAllocation` (Ray head + driver on the first node, Ray workers on the
others). `executor_parameters` is the one table from `SlurmClusterSpec` to submitit's (sbatch) parameters;
`sbatch_script` renders exactly the script `submit` hands to sbatch (for `plan`).

Files under `<sweep_dir>/slurm/`: `<job>_submission.sh` (the sbatch script), `<job>_submitted.pkl` (the
callable), `<job>_<task>_log.out` / `.err` (each node's output; node 0 holds the Ray head's and the
driver's), `<job>_<task>_result.pkl`, and `ray-<job>-<restart>/` while the job runs (rendezvous, token).
`submit` records {"backend": "slurm", "job_id": ...} under "backend" in `<sweep_dir>/state.json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import submitit

from cluster.slurm.config import SlurmClusterSpec
from cluster.slurm.launcher import RayAllocation, allocation_plan
from jobs.storage import file_lock

__all__ = [
    "SLURM_SWEEP_STATES", "SlurmBackend", "SlurmError", "SlurmJobStatus", "SlurmLogs", "SlurmUnavailableError",
    "executor_parameters", "record_submission", "sweep_state",
]  # fmt: skip

# Slurm job states (squeue / sacct, 22.05) -> sweep states (pending | running | finished | failed | cancelled).
SLURM_SWEEP_STATES = {
    "PENDING": "pending", "REQUEUED": "pending", "REQUEUE_FED": "pending", "REQUEUE_HOLD": "pending",
    "CONFIGURING": "pending", "RESIZING": "pending", "SUSPENDED": "pending", "STOPPED": "pending",
    "SPECIAL_EXIT": "pending", "SIGNALING": "running", "STAGE_OUT": "running",
    "RUNNING": "running", "COMPLETING": "running",
    "COMPLETED": "finished",
    "CANCELLED": "cancelled", "REVOKED": "cancelled",
    "FAILED": "failed", "TIMEOUT": "failed", "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed", "BOOT_FAIL": "failed",
    "DEADLINE": "failed", "PREEMPTED": "failed",
}  # fmt: skip
STATE_FILE = "state.json"
_STATE_LOCK = ".state.lock"


class SlurmError(RuntimeError):
    """A Slurm command failed; the message has its output."""


class SlurmUnavailableError(SlurmError):
    """No Slurm client commands (sbatch, squeue, sacct, scancel) on this machine's PATH."""


def sweep_state(slurm_state: str) -> str:
    """A Slurm state ("CANCELLED by 0", "RUNNING", ...) as a sweep state; "unknown" for one not in the table."""
    word = slurm_state.split()[0].rstrip("+").upper() if slurm_state.strip() else ""
    return SLURM_SWEEP_STATES.get(word, "unknown")


@dataclass(frozen=True)
class SlurmJobStatus:
    """A Slurm job as squeue (while it is known there) or sacct report it."""

    job_id: str
    slurm_state: str  # e.g. RUNNING, PENDING, COMPLETED, CANCELLED, TIMEOUT, UNKNOWN
    reason: str = ""  # squeue's reason for a pending job (Priority, Resources, BeginTime, ...)
    exit_code: str = ""  # sacct's ExitCode, "status:signal"
    elapsed: str = ""
    nodes: str = ""
    source: str = ""  # "squeue" or "sacct" ("" when neither knows the job)

    @property
    def state(self) -> str:
        """The sweep state: pending | running | finished | failed | cancelled | unknown."""
        return sweep_state(self.slurm_state)

    @property
    def terminal(self) -> bool:
        return self.state in ("finished", "failed", "cancelled")


@dataclass(frozen=True)
class SlurmLogs:
    """The log files of a job: one stdout and one stderr per task (node); task 0 has the Ray head and driver."""

    job_id: str
    folder: Path
    stdout: list[Path] = field(default_factory=list)
    stderr: list[Path] = field(default_factory=list)

    def read(self, tail: int | None = None) -> str:
        """Every log file that exists, each under a header line; the last `tail` lines of each if given."""
        parts = []
        for path in [p for pair in zip(self.stdout, self.stderr, strict=True) for p in pair]:
            if not path.exists():
                continue
            lines = path.read_text(errors="replace").splitlines()
            parts.append(f"==> {path} <==\n" + "\n".join(lines[-tail:] if tail else lines))
        return "\n".join(parts)


# ------------------------------------------------------------------------------------------ the mapping


def executor_parameters(spec: SlurmClusterSpec, sweep_dir: str | Path) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (sbatch names, as `update_parameters` takes them) for `spec`.

    One task per node; `time` in whole minutes (submitit's requeue logic counts minutes); `mem` and
    `sbatch_extra` go through `additional_parameters` verbatim (submitit would rewrite a `mem` of its own);
    requeue -> --requeue / --no-requeue."""
    extra: dict[str, Any] = {}
    if spec.mem is not None:
        extra["mem"] = str(spec.mem)
    extra["requeue" if spec.requeue else "no-requeue"] = True
    extra.update(spec.sbatch_options())
    params: dict[str, Any] = {
        "job_name": spec.job_name or f"ckd-{Path(sweep_dir).name}",
        "time": spec.timeout_min,
        "nodes": spec.nodes,
        "ntasks_per_node": 1,
        "cpus_per_task": spec.cpus_per_task,
        "gpus_per_node": spec.gpus_per_node or None,
        "partition": spec.partition,
        "account": spec.account,
        "qos": spec.qos,
        "constraint": spec.constraint,
        "exclude": spec.exclude,
        "setup": list(spec.setup) or None,
        "signal_delay_s": spec.signal_delay_s,
        "additional_parameters": extra,
    }
    return {k: v for k, v in params.items() if v is not None}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _state_lock(sweep_dir: Path) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock on `<sweep_dir>/.state.lock` for a read-modify-write of state.json (the driver
    writes it too, under the same lock)."""
    return file_lock(sweep_dir / _STATE_LOCK)


def record_submission(sweep_dir: str | Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `fields` into state.json's "backend" mapping (other keys are kept; "status" is set to "pending"
    only when absent), atomically; returns the new state."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / STATE_FILE
    with _state_lock(sweep_dir):
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            state = {}
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        backend = state.get("backend") if isinstance(state.get("backend"), dict) else {}
        state["backend"] = {**backend, **fields}
        state.setdefault("status", "pending")
        state["updated"] = _now()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, path)
    return state


# ------------------------------------------------------------------------------------------ the backend


class _ScriptExecutor(submitit.SlurmExecutor):
    """A SlurmExecutor that renders scripts where no Slurm is installed (for `plan`)."""

    @classmethod
    def affinity(cls) -> int:
        return 1


class SlurmBackend:
    """Runs sweeps as Slurm jobs through submitit.

    Args:
        executor_class: the submitit executor (a fake in unit tests).
        command_timeout: seconds for each squeue / sacct / scancel call.
    """

    executor_class: type[submitit.SlurmExecutor] = submitit.SlurmExecutor

    def __init__(self, *, executor_class: type[submitit.SlurmExecutor] | None = None,
                 command_timeout: float = 60.0) -> None:
        if executor_class is not None:
            self.executor_class = executor_class
        self.command_timeout = command_timeout

    # ---------------------------------------------------------------------------------------- submission

    @staticmethod
    def folder(sweep_dir: str | Path) -> Path:
        """submitit's folder: scripts, pickles and logs of the sweep's jobs."""
        return Path(sweep_dir).resolve() / "slurm"

    def _executor(self, cls: type[submitit.SlurmExecutor], sweep_dir: str | Path,
                  spec: SlurmClusterSpec) -> submitit.SlurmExecutor:
        python = spec.python or shlex.quote(sys.executable)
        executor = cls(folder=self.folder(sweep_dir), max_num_timeout=spec.max_timeouts, python=python)
        executor.update_parameters(**executor_parameters(spec, sweep_dir))
        return executor

    @staticmethod
    def allocation(sweep_dir: str | Path, spec: SlurmClusterSpec,
                   command: Sequence[str] | None = None) -> RayAllocation:
        """The callable each node runs (see cluster.slurm.launcher). The sweep driver (the default command)
        writes its output to the sweep's logs/driver.log, where `ckd-orchestrate logs` finds it."""
        sweep_dir = Path(sweep_dir).resolve()
        return RayAllocation(sweep_dir, command, gpus_per_node=spec.gpus_per_node,
                             include_dashboard=spec.ray_dashboard, requeue=spec.requeue,
                             signal_delay_s=spec.signal_delay_s,
                             driver_log=sweep_dir / "logs" / "driver.log" if command is None else None)

    def sbatch_script(self, sweep_dir: str | Path, spec: SlurmClusterSpec) -> str:
        """The batch script `submit` gives sbatch, exactly (works without Slurm installed)."""
        executor = self._executor(_ScriptExecutor, sweep_dir, spec)
        return executor._make_submission_file_text(executor._submitit_command_str, "plan")

    @staticmethod
    def node_commands(sweep_dir: str | Path, spec: SlurmClusterSpec, command: Sequence[str] | None = None,
                      job_id: int = 0) -> str:
        """What each node runs inside the allocation (Ray head, workers, driver), as text for `plan`."""
        mem_mb = None
        if spec.mem is not None and str(spec.mem) != "0":
            mem_mb = _mem_mb(str(spec.mem))
        return allocation_plan(sweep_dir=Path(sweep_dir).resolve(), nodes=spec.nodes,
                               cpus_per_task=spec.cpus_per_task, gpus_per_node=spec.gpus_per_node,
                               include_dashboard=spec.ray_dashboard, python=spec.python or sys.executable,
                               job_id=job_id, command=command, mem_per_node_mb=mem_mb)

    def submit(self, sweep_dir: str | Path, spec: SlurmClusterSpec, *, command: Sequence[str] | None = None) -> str:
        """Submit the sweep's job and return its Slurm job id at once; record it in state.json.

        Args:
            sweep_dir: the sweep directory (on a file system the compute nodes share).
            spec: the validated `cluster:` block.
            command: the driver command run on the head (argv); default `python -m orchestrator.driver
                <sweep_dir>` with the job's interpreter.

        Raises:
            SlurmUnavailableError: no sbatch/srun here.
            SlurmError: sbatch refused the job (its message says why).
        """
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise SlurmUnavailableError("sbatch/srun are not on the PATH: submit from a Slurm login node (or "
                                        "`module load slurm`); cluster/slurm/testbed.sh starts a local test cluster")
        sweep_dir = Path(sweep_dir).resolve()
        executor = self._executor(self.executor_class, sweep_dir, spec)
        try:
            job = executor.submit(self.allocation(sweep_dir, spec, command))
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError) as err:
            raise SlurmError(f"sbatch refused the job: {err}") from None
        job_id = str(job.job_id)
        record_submission(sweep_dir, {"backend": "slurm", "job_id": job_id, "folder": str(self.folder(sweep_dir)),
                                      "submitted": _now()})
        return job_id

    # ---------------------------------------------------------------------------------------- watching

    def _run(self, cmd: list[str]) -> subprocess.CompletedProcess[str]:
        if shutil.which(cmd[0]) is None:
            raise SlurmUnavailableError(f"{cmd[0]} is not on the PATH: run this on a Slurm login node")
        return subprocess.run(cmd, capture_output=True, text=True, timeout=self.command_timeout, check=False)

    def status(self, job_id: str) -> SlurmJobStatus:
        """The job's state: from squeue while the controller knows the job, else from sacct (accounting);
        slurm_state "UNKNOWN" when neither knows it (sacct can lag the controller by seconds).

        Raises:
            SlurmUnavailableError: squeue / sacct are missing.
        """
        job_id = str(job_id)
        out = self._run(["squeue", "-h", "-j", job_id, "-o", "%i|%T|%r|%N|%M"])
        for line in out.stdout.splitlines() if out.returncode == 0 else []:
            parts = line.split("|")
            if len(parts) == 5 and parts[0] == job_id:
                reason = "" if parts[2] in ("None", "(null)") else parts[2]
                return SlurmJobStatus(job_id, parts[1], reason=reason, nodes=parts[3], elapsed=parts[4],
                                      source="squeue")
        out = self._run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode,Elapsed,NodeList"])
        if out.returncode == 0:
            for line in out.stdout.splitlines():
                parts = line.split("|")
                if len(parts) == 5 and parts[0] == job_id:
                    return SlurmJobStatus(job_id, parts[1].split()[0] if parts[1] else "UNKNOWN",
                                          exit_code=parts[2], elapsed=parts[3], nodes=parts[4], source="sacct")
        return SlurmJobStatus(job_id, "UNKNOWN")

    def wait(self, job_id: str, *, timeout: float, until: Sequence[str] = ("finished", "failed", "cancelled"),
             interval: float = 1.0) -> SlurmJobStatus:
        """Poll `status` until the sweep state is one of `until`.

        Raises:
            TimeoutError: not reached within `timeout` seconds (the message has the last status).
        """
        end = time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if status.state in until:
                return status
            if time.monotonic() >= end:
                raise TimeoutError(f"job {job_id} is still {status.slurm_state} after {timeout:.0f} s")
            time.sleep(interval)

    def logs(self, job_id: str, sweep_dir: str | Path) -> SlurmLogs:
        """The job's log files (those of every task that has started; task 0's even before it starts)."""
        folder = self.folder(sweep_dir)
        job_id = str(job_id)
        tasks = sorted({int(p.name.split("_")[1]) for p in folder.glob(f"{job_id}_*_log.*")
                        if p.name.split("_")[1].isdigit()} | {0})
        paths = [submitit.core.utils.JobPaths(folder, job_id=job_id, task_id=t) for t in tasks]
        return SlurmLogs(job_id, folder, [p.stdout for p in paths], [p.stderr for p in paths])

    def cancel(self, job_id: str) -> None:
        """scancel the job (a job that has already ended is left as it is).

        Raises:
            SlurmError: scancel failed for another reason (its message says why).
        """
        out = self._run(["scancel", str(job_id)])
        if out.returncode != 0:
            message = (out.stderr or out.stdout).strip()
            if "already completed" in message or "Job/step already completing or completed" in message:
                return
            raise SlurmError(f"scancel {job_id} failed: {message}")


def _mem_mb(mem: str) -> int:
    """sbatch --mem (a validated SlurmClusterSpec.mem) in MB."""
    text = mem.strip().upper().removesuffix("B")
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    if text and text[-1] in units:
        return int(int(text[:-1]) * units[text[-1]])
    return int(text)

"""`SlurmBackend`: a sweep's driver as one Slurm job through submitit, with a Ray cluster over its nodes.

The job is a submitit `SlurmExecutor` job with folder `<sweep_dir>/slurm`: `nodes` nodes, one task per node,
each running `cluster.slurm.launcher.RayAllocation` (Ray head + the driver's command line from the
`DriverLaunch` on the first node, Ray workers on the others). `executor_parameters` is the one table from
`SlurmClusterSpec` to submitit's (sbatch) parameters; `sbatch_script` renders exactly the script `submit`
hands to sbatch, and `plan_text` shows it with what each node runs.

Files under `<sweep_dir>/slurm/`: `<job>_submission.sh` (the sbatch script), `<job>_submitted.pkl` (the
callable), `<job>_<task>_log.out` / `.err` (each node's output; node 0 holds the Ray head's and the
launcher's), `<job>_<task>_result.pkl`, `ray-<job>-<restart>/` while the job runs (rendezvous, token), and
`requeued-<job>.json` while a requeued job waits for its next run. The driver's own output goes to the
sweep's `logs/driver.log`.

`submit` returns the job reference {"backend": "slurm", "job_id", "folder", "sweep_dir", "submitted"}; the
orchestrator keeps it in state.json, and everything `status`, `logs` and `cancel` need is in it and on the
shared file system, so they work from any login node that sees the sweep directory.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import submitit

from cluster.base import Backend, DriverLaunch, JobRef, JobStatus, SweepStatus, TrialShape
from cluster.slurm.commands import allocation_plan, requeue_marker
from cluster.slurm.config import SlurmClusterSpec
from cluster.slurm.launcher import RayAllocation

__all__ = [
    "SLURM_SWEEP_STATES", "SlurmBackend", "SlurmError", "SlurmJobStatus", "SlurmLogs", "SlurmUnavailableError",
    "describe_job", "executor_parameters", "sweep_state",
]  # fmt: skip

_P, _R, _F, _X, _C = (SweepStatus.PENDING, SweepStatus.RUNNING, SweepStatus.FINISHED, SweepStatus.FAILED,
                      SweepStatus.CANCELLED)
# Slurm job states (squeue / sacct, 22.05) -> the sweep status they mean for the job.
SLURM_SWEEP_STATES: dict[str, SweepStatus] = {
    "PENDING": _P, "REQUEUED": _P, "REQUEUE_FED": _P, "REQUEUE_HOLD": _P, "CONFIGURING": _P, "RESIZING": _P,
    "SUSPENDED": _P, "STOPPED": _P, "SPECIAL_EXIT": _P, "SIGNALING": _R, "STAGE_OUT": _R,
    "RUNNING": _R, "COMPLETING": _R,
    "COMPLETED": _F,
    "CANCELLED": _C, "REVOKED": _C,
    "FAILED": _X, "TIMEOUT": _X, "NODE_FAIL": _X, "OUT_OF_MEMORY": _X, "BOOT_FAIL": _X, "DEADLINE": _X,
    "PREEMPTED": _X,
}  # fmt: skip
# Slurm's view of the job -> the sweep status `status` reports as implied, for when the driver could not record
# one itself (killed at the time limit, out of memory, a node failure, scancel from outside ckd-orchestrate).
# A completed job is not among them: only the driver knows whether its sweep finished.
_ENDED_AS = (SweepStatus.FAILED, SweepStatus.CANCELLED)
# The driver's output in the sweep directory (appended by every run of the job): what `ckd-orchestrate logs`
# reads there, so `logs` falls back to Slurm's own logs only until it exists.
DRIVER_LOG = Path("logs") / "driver.log"


class SlurmError(RuntimeError):
    """A Slurm command failed; the message has its output."""


class SlurmUnavailableError(SlurmError):
    """No Slurm client commands (sbatch, squeue, sacct, scancel) on this machine's PATH."""


def sweep_state(slurm_state: str) -> SweepStatus | None:
    """A Slurm state ("CANCELLED by 0", "RUNNING", ...) as a sweep status; None for one not in the table."""
    word = slurm_state.split()[0].rstrip("+").upper() if slurm_state.strip() else ""
    return SLURM_SWEEP_STATES.get(word)


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
    def state(self) -> SweepStatus | None:
        """The sweep status the job's Slurm state means; None when Slurm does not know it (yet)."""
        return sweep_state(self.slurm_state)

    @property
    def terminal(self) -> bool:
        return self.state is not None and self.state.is_terminal


@dataclass(frozen=True)
class SlurmLogs:
    """The log files of a job: one stdout and one stderr per task (node); task 0 has the Ray head's."""

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


def describe_job(status: SlurmJobStatus) -> str:
    """One line about the job for `status`, e.g. "Slurm job 12: RUNNING on node1 (elapsed 0:03:10)"."""
    if not status.source:
        return f"Slurm job {status.job_id}: not known to squeue or sacct (yet)"
    line = f"Slurm job {status.job_id}: {status.slurm_state}"
    if status.reason:
        line += f" ({status.reason})"
    if status.nodes and status.nodes not in ("None assigned", "(null)"):
        line += f" on {status.nodes}"
    details = [f"elapsed {status.elapsed}"] if status.elapsed else []
    if status.exit_code and status.source == "sacct":
        details.append(f"exit code {status.exit_code}")
    return line + (f" ({', '.join(details)})" if details else "")


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


def _mem_mb(mem: str) -> int:
    """sbatch --mem (a validated SlurmClusterSpec.mem) in MB."""
    text = mem.strip().upper().removesuffix("B")
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    if text and text[-1] in units:
        return int(int(text[:-1]) * units[text[-1]])
    return int(text)


# ------------------------------------------------------------------------------------------ the backend


class _ScriptExecutor(submitit.SlurmExecutor):
    """A SlurmExecutor that renders scripts where no Slurm is installed (for `plan`)."""

    @classmethod
    def affinity(cls) -> int:
        return 1


class SlurmBackend(Backend):
    """Runs a sweep's driver as one Slurm job through submitit (see the module docstring).

    Args:
        spec: the grid's validated `cluster:` block.
        executor_class: the submitit executor (a fake in unit tests); default the class attribute.
        command_timeout: seconds for each squeue / sacct / scancel call.
    """

    name = "slurm"
    shares_sweep_dir = True  # the compute nodes see the sweep directory (a shared file system)
    executor_class: ClassVar[type[submitit.SlurmExecutor]] = submitit.SlurmExecutor
    spec: SlurmClusterSpec

    def __init__(self, spec: SlurmClusterSpec, *, executor_class: type[submitit.SlurmExecutor] | None = None,
                 command_timeout: float = 60.0) -> None:
        super().__init__(spec)
        if executor_class is not None:
            self.executor_class = executor_class
        self.command_timeout = command_timeout

    def interpreter(self) -> str:
        """The grid's `python` (the command starting Python on the nodes), else this interpreter."""
        return self.spec.python or sys.executable

    # ---------------------------------------------------------------------------------------- plan

    def plan_problems(self, trial: TrialShape, launch: DriverLaunch) -> list[str]:
        """A trial that can never be placed on the allocation (a worker larger than a node, or a trial larger
        than all nodes together)."""
        found = self.spec.trial_fit_problems(workers=trial.workers, cpus_per_worker=trial.cpus_per_worker,
                                             gpus_per_worker=trial.gpus_per_worker, driver_cpus=trial.driver_cpus)
        return [f"sweep.resources: {problem}" for problem in found]

    def plan_text(self, launch: DriverLaunch) -> list[tuple[str, str]]:
        """The sbatch script `submit` would hand to sbatch, and what each node runs inside the allocation."""
        return [("sbatch script", self.sbatch_script(launch.sweep_dir)),
                ("what the nodes run inside the allocation", self.node_commands(launch))]

    # ---------------------------------------------------------------------------------------- submission

    @staticmethod
    def folder(sweep_dir: str | Path) -> Path:
        """submitit's folder: scripts, pickles and logs of the sweep's jobs."""
        return Path(sweep_dir).resolve() / "slurm"

    def _executor(self, cls: type[submitit.SlurmExecutor], sweep_dir: str | Path) -> submitit.SlurmExecutor:
        python = self.spec.python or shlex.quote(sys.executable)
        executor = cls(folder=self.folder(sweep_dir), max_num_timeout=self.spec.max_timeouts, python=python)
        executor.update_parameters(**executor_parameters(self.spec, sweep_dir))
        return executor

    def allocation(self, launch: DriverLaunch) -> RayAllocation:
        """The callable each node runs (see cluster.slurm.launcher); the driver's output goes to the sweep's
        logs/driver.log, where `ckd-orchestrate logs` finds it."""
        sweep_dir = Path(launch.sweep_dir).resolve()
        return RayAllocation(sweep_dir, launch.argv, env=launch.env, gpus_per_node=self.spec.gpus_per_node,
                             include_dashboard=self.spec.ray_dashboard, requeue=self.spec.requeue,
                             signal_delay_s=self.spec.signal_delay_s, driver_log=sweep_dir / DRIVER_LOG)

    def sbatch_script(self, sweep_dir: str | Path) -> str:
        """The batch script `submit` gives sbatch, exactly (works without Slurm installed)."""
        executor = self._executor(_ScriptExecutor, sweep_dir)
        return executor._make_submission_file_text(executor._submitit_command_str, "plan")

    def node_commands(self, launch: DriverLaunch, job_id: int = 0) -> str:
        """What each node runs inside the allocation (Ray head, workers, the driver), as text for `plan`."""
        spec = self.spec
        mem_mb = _mem_mb(str(spec.mem)) if spec.mem is not None and str(spec.mem) != "0" else None
        return allocation_plan(sweep_dir=Path(launch.sweep_dir).resolve(), driver_argv=launch.argv,
                               nodes=spec.nodes, cpus_per_task=spec.cpus_per_task, gpus_per_node=spec.gpus_per_node,
                               include_dashboard=spec.ray_dashboard, python=self.interpreter(), job_id=job_id,
                               mem_per_node_mb=mem_mb)

    def submit(self, launch: DriverLaunch, previous: Mapping[str, Any] | None = None) -> JobRef:
        """sbatch the sweep's job and return its reference at once (a resume submits a new job the same way:
        the driver restores the sweep from its directory).

        Raises:
            SlurmUnavailableError: no sbatch/srun here.
            SlurmError: sbatch refused the job (its message says why).
        """
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise SlurmUnavailableError("sbatch/srun are not on the PATH: submit from a Slurm login node (or "
                                        "`module load slurm`); cluster/slurm/testbed.sh starts a local test cluster")
        sweep_dir = Path(launch.sweep_dir).resolve()
        executor = self._executor(self.executor_class, sweep_dir)
        try:
            job = executor.submit(self.allocation(launch))
        except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError) as err:
            raise SlurmError(f"sbatch refused the job: {err}") from None
        return {"backend": self.name, "job_id": str(job.job_id), "folder": str(self.folder(sweep_dir)),
                "sweep_dir": str(sweep_dir), "submitted": _now()}

    # ---------------------------------------------------------------------------------------- watching

    @staticmethod
    def job_id(job: Mapping[str, Any]) -> str:
        """The Slurm job id of a job reference.

        Raises:
            LookupError: not a reference `submit` returned (another backend's, or one that lost its id).
        """
        if job.get("backend") != "slurm" or not job.get("job_id"):
            raise LookupError(f"no Slurm job recorded under 'backend' (expected {{'backend': 'slurm', 'job_id': "
                              f"...}}, found {dict(job)!r})")
        return str(job["job_id"])

    @staticmethod
    def _sweep_dir(job: Mapping[str, Any]) -> Path:
        # references written before "sweep_dir" was part of them have only submitit's folder, <sweep_dir>/slurm
        return Path(job["sweep_dir"]) if job.get("sweep_dir") else Path(job["folder"]).parent

    def _run(self, cmd: list[str]) -> subprocess.CompletedProcess[str]:
        if shutil.which(cmd[0]) is None:
            raise SlurmUnavailableError(f"{cmd[0]} is not on the PATH: run this on a Slurm login node")
        return subprocess.run(cmd, capture_output=True, text=True, timeout=self.command_timeout, check=False)

    def job_status(self, job_id: str) -> SlurmJobStatus:
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

    def status(self, job: Mapping[str, Any]) -> JobStatus:
        """The job's line for `status`; FAILED / CANCELLED when Slurm says the job ended so (the driver may not
        have been able to record it); `requeued` while a job the launcher saw requeued waits to run again.

        Raises:
            LookupError: `job` is not a Slurm job reference.
            SlurmUnavailableError: squeue / sacct are missing.
        """
        status = self.job_status(self.job_id(job))
        requeued = (status.state is SweepStatus.PENDING
                    and requeue_marker(self._sweep_dir(job), status.job_id).is_file())
        return JobStatus(line=describe_job(status), state=status.state if status.state in _ENDED_AS else None,
                         requeued=requeued)

    def wait(self, job_id: str, *, timeout: float, until: Collection[SweepStatus] = (_F, _X, _C),
             interval: float = 1.0) -> SlurmJobStatus:
        """Poll `job_status` until the job's sweep status is one of `until` (default: it has ended).

        Raises:
            TimeoutError: not reached within `timeout` seconds (the message has the last status).
        """
        end = time.monotonic() + timeout
        while True:
            status = self.job_status(job_id)
            if status.state in until:
                return status
            if time.monotonic() >= end:
                raise TimeoutError(f"job {job_id} is still {status.slurm_state} after {timeout:.0f} s")
            time.sleep(interval)

    def job_logs(self, job: Mapping[str, Any]) -> SlurmLogs:
        """The job's log files (those of every task that has started; task 0's even before it starts)."""
        job_id = self.job_id(job)
        folder = Path(job["folder"]) if job.get("folder") else self.folder(self._sweep_dir(job))
        tasks = sorted({int(p.name.split("_")[1]) for p in folder.glob(f"{job_id}_*_log.*")
                        if p.name.split("_")[1].isdigit()} | {0})
        paths = [submitit.core.utils.JobPaths(folder, job_id=job_id, task_id=t) for t in tasks]
        return SlurmLogs(job_id, folder, [p.stdout for p in paths], [p.stderr for p in paths])

    def logs(self, job: Mapping[str, Any], tail: int | None) -> str | None:
        """None once the driver has started (its output is in the sweep's logs/driver.log, on the shared file
        system); before that, the job's own Slurm logs, which say why it has not (yet) started it."""
        job_id = self.job_id(job)
        driver_log = self._sweep_dir(job) / DRIVER_LOG
        if driver_log.is_file():
            return None
        text = self.job_logs(job).read(tail)
        note = f"(the driver has not started: no {driver_log}; Slurm job {job_id}'s own logs follow)"
        return f"{note}\n{text}" if text else f"{note}\n(none yet: {describe_job(self.job_status(job_id))})"

    def scancel(self, job_id: str) -> None:
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

    def cancel(self, job: Mapping[str, Any], timeout_s: float) -> None:
        """scancel the job and wait until Slurm reports it ended (its processes, Ray included, are gone then).

        Raises:
            TimeoutError: the job is still there after `timeout_s` seconds.
        """
        job_id = self.job_id(job)
        self.scancel(job_id)
        self.wait(job_id, timeout=timeout_s)

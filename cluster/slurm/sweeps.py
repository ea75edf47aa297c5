"""The Slurm backend as the CLI sees it: `Sweeps` submits, describes, shows the driver's log of and cancels a
sweep that runs as one Slurm job (see `cluster.slurm.backend.SlurmBackend`).

Everything a later command needs is in the sweep's state.json under "backend" ({"backend": "slurm",
"job_id", "folder", "submitted"}), on the shared file system, so `status`, `logs` and `cancel` work from any
login node that sees the sweep directory.
"""

from __future__ import annotations

from typing import Any

from cluster.slurm.backend import SlurmBackend, SlurmJobStatus
from orchestrator.state import SweepDir

__all__ = ["Sweeps", "describe_job"]

# Slurm's view of the job -> the sweep status it implies when the driver could not record one itself
# (killed at the time limit, out of memory, a node failure, scancel from outside ckd-orchestrate).
_ENDED_AS = {"failed": "failed", "cancelled": "cancelled"}


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


class Sweeps:
    """The remote-backend interface of orchestrator.submit for Slurm.

    Args:
        backend: the SlurmBackend doing the work (its command timeout bounds each squeue / sacct call).
    """

    def __init__(self, backend: SlurmBackend | None = None) -> None:
        self.backend = backend or SlurmBackend()

    @staticmethod
    def job_id(sweep: SweepDir) -> str:
        """The sweep's Slurm job id from state.json.

        Raises:
            LookupError: the sweep was not submitted to Slurm (or its state.json lost the record).
        """
        backend = sweep.state().get("backend") or {}
        if backend.get("backend") != "slurm" or not backend.get("job_id"):
            raise LookupError(f"{sweep.path / 'state.json'}: no Slurm job recorded under 'backend' "
                              f"(expected {{'backend': 'slurm', 'job_id': ...}}, found {backend!r})")
        return str(backend["job_id"])

    def submit(self, sweep: SweepDir, grid: Any) -> str:
        """sbatch the sweep's job (Ray over the allocation, then `python -m orchestrator.driver <sweep>` on the
        head) and return its job id at once; state.json gets {"backend": "slurm", "job_id": ...}."""
        return self.backend.submit(sweep.path, grid.cluster)

    def describe(self, sweep: SweepDir) -> tuple[str, str | None]:
        """(the job's line, "failed"/"cancelled" when the job ended so while state.json still says the sweep is
        pending or running, else None)."""
        status = self.backend.status(self.job_id(sweep))
        implied = None
        if sweep.state().get("status") in ("pending", "running"):
            implied = _ENDED_AS.get(status.state)
        return describe_job(status), implied

    def driver_log(self, sweep: SweepDir, tail: int | None) -> str | None:
        """None once the driver has started (its output is in the sweep's logs/driver.log, on the shared file
        system); before that, the job's own Slurm logs, which say why it has not (yet) started it."""
        if sweep.log_file.is_file():
            return None
        job_id = self.job_id(sweep)
        text = self.backend.logs(job_id, sweep.path).read(tail)
        note = f"(the driver has not started: no {sweep.log_file}; Slurm job {job_id}'s own logs follow)"
        return f"{note}\n{text}" if text else f"{note}\n(none yet: {describe_job(self.backend.status(job_id))})"

    def cancel(self, sweep: SweepDir, timeout_s: float) -> None:
        """scancel the job and wait until Slurm reports it ended (its processes, Ray included, are gone then).

        Raises:
            TimeoutError: the job is still there after `timeout_s` seconds.
        """
        job_id = self.job_id(sweep)
        self.backend.cancel(job_id)
        self.backend.wait(job_id, timeout=timeout_s, until=("finished", "failed", "cancelled"))

"""Submitting, following and stopping sweeps through the backend interface (cluster.base.Backend).

The orchestrator owns the sweep's record: it creates the sweep directory, builds the driver's launch
(orchestrator.launch), hands it to the backend, keeps the job reference the backend returns in state.json
(under "backend") and passes it back on every later call. What a backend reports (`JobStatus`) is applied
to the sweep's status here, by these rules:

- a requeued job: the sweep is pending again;
- a job that runs while the sweep reads pending: running (a driver on another file system cannot say so);
- a job that ended failed or cancelled while the sweep reads pending or running: that status (the driver
  was killed before it could record it: a time limit, an OOM kill, a cancel from outside);
- for a backend whose machines keep their own sweep directory (`shares_sweep_dir = False`), the parent
  run, the champion and "finished" come from MLflow (orchestrator.records).

A blocking local `submit` (no --detach) runs the driver in this process: it is the driver.
`status`, `logs`, `cancel` and `best` read the cluster block from sweep.json without validating the grid.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rich.markup import escape

from cluster.base import Backend, ClusterSpec, ClusterSpecError, JobStatus, SweepStatus, backend_class, config_model
from jobs.storage import redact_text, redact_uri
from orchestrator import records
from orchestrator.console import console, print_champion, print_status
from orchestrator.launch import driver_launch
from orchestrator.state import SweepDir, SweepFileError, new_sweep_id

__all__ = [
    "backend_errors", "backend_of", "cancel", "cluster_spec_of", "create_sweep", "driver_log", "grid_of",
    "refresh_status", "resume", "show_status", "start_driver", "submit",
]  # fmt: skip

_ACTIVE = (SweepStatus.PENDING, SweepStatus.RUNNING)


def create_sweep(grid: Any, grid_file: Path) -> SweepDir:
    """A new sweep directory for `grid` (validated), registered in the sweep index."""
    from jobs import tracking

    sweep = SweepDir(grid.sweep_root / new_sweep_id(Path(grid_file).stem))
    sweep.create(grid_file, grid.to_dict(), tracking.git_commit(Path(__file__).resolve().parent.parent))
    return sweep


def cluster_spec_of(sweep: SweepDir) -> ClusterSpec:
    """The sweep's validated `cluster:` block, from sweep.json (the grid's points are not validated again)."""
    data = dict(sweep.record()["grid"].get("cluster") or {"backend": "local"})
    try:
        return config_model(str(data.get("backend", "local"))).from_mapping(data)
    except ClusterSpecError as err:  # the project's one wording of a pydantic error, first problems only
        detail = "; ".join(f"{key}: {message}" if key else message for key, message in err.issues[:3])
    except ValueError as err:  # an unknown backend
        detail = str(err)
    raise SweepFileError(f"{sweep.path / 'sweep.json'}: the recorded cluster block is not valid here: {detail}")


def backend_of(sweep: SweepDir) -> Backend:
    """The backend the sweep was submitted to, built from its recorded `cluster:` block."""
    spec = cluster_spec_of(sweep)
    recorded = (sweep.state().get("backend") or {}).get("backend")
    if recorded is not None and recorded != spec.backend:  # never ask (or cancel through) the wrong backend
        raise SweepFileError(f"{sweep.path / 'state.json'}: holds a {recorded} job, but the sweep was submitted "
                             f"to the {spec.backend} backend (sweep.json); the sweep's files disagree")
    return backend_class(spec.backend)(spec)


@contextlib.contextmanager
def backend_errors(backend: str, what: str) -> Iterator[None]:
    """A backend's failure (unreachable scheduler, a job it no longer knows) as one error line and exit 2."""
    try:
        yield
    except Exception as err:
        console.print(f"[red]error:[/] {escape(f'{what} ({backend}): {err}')}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


def _record_job(sweep: SweepDir, backend: Backend, job: Mapping[str, Any], launch_uri: str, experiment: str) -> None:
    """Keep the job reference in state.json; for a backend with its own sweep directory also where this
    machine finds the sweep's MLflow runs (the backend may name another address for it: "tracking_uri")."""
    job = dict(job)
    uri = job.pop("tracking_uri", launch_uri)
    if backend.shares_sweep_dir:
        sweep.update_state(backend=job)
    else:
        sweep.update_state(backend=job, tracking_uri=redact_uri(uri), experiment=experiment)


def start_driver(sweep: SweepDir, grid: Any, backend: Backend,
                 previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Hand the sweep's driver launch to `backend` and keep the job reference it returns in state.json.

    Args:
        previous: the job of an earlier attempt (a resume), as state.json has it.
    """
    launch = driver_launch(sweep, grid, backend)
    job = backend.submit(launch, previous)
    _record_job(sweep, backend, job, launch.tracking_uri, grid.mlflow.experiment)
    return job


def _run_here(sweep: SweepDir) -> int:
    """Run the driver in this process (a blocking local submit or resume); Ctrl-C cancels."""
    from orchestrator.driver import run_sweep

    sweep.log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(sweep.log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    sweep.update_state(backend={"backend": "local", "pid": os.getpid(), "detached": False})
    try:
        state = run_sweep(sweep)
    except KeyboardInterrupt:
        console.print(f"sweep {sweep.sweep_id} cancelled; `ckd-orchestrate resume {sweep.sweep_id}` continues it")
        return 130
    except Exception as err:  # the driver recorded the failure in state.json; its traceback goes to the log
        logging.getLogger(__name__).exception("sweep %s failed", sweep.sweep_id)
        first = redact_text(str(err)).strip().splitlines()[:1]
        console.print(f"error: sweep {sweep.sweep_id} failed: {type(err).__name__}: "
                      f"{first[0] if first else ''} (details in {sweep.log_file})",
                      highlight=False, markup=False)
        return 1
    finally:
        logging.getLogger().removeHandler(handler)
    print_status(sweep, *refresh_status(sweep))
    print_champion(state)
    return 0


def submit(grid: Any, grid_file: Path, *, detach: bool) -> int:
    """Submit a validated grid: a new sweep, its driver started on the grid's backend."""
    backend = backend_class(grid.backend)(grid.cluster)
    sweep = create_sweep(grid, grid_file)
    if backend.name == "local":
        console.print(f"sweep [bold]{sweep.sweep_id}[/] in {sweep.path}")
        if not detach:
            return _run_here(sweep)
        job = start_driver(sweep, grid, backend, None)
        console.print(f"running in the background (pid {job['pid']}); follow it with `ckd-orchestrate status "
                      f"{sweep.sweep_id}` or `ckd-orchestrate logs {sweep.sweep_id}`")
        print(sweep.sweep_id)
        return 0
    try:
        job = start_driver(sweep, grid, backend, None)
    except Exception as err:
        sweep.set_status(SweepStatus.FAILED, error=f"submission to {grid.backend} failed: {err}"[:2000])
        console.print(f"[red]error:[/] {escape(f'submitting sweep {sweep.sweep_id} to {grid.backend} failed: {err}')}",
                      highlight=False, soft_wrap=True)
        return 1
    console.print(f"sweep [bold]{sweep.sweep_id}[/] in {sweep.path}; {grid.backend} job [bold]{job['job_id']}[/]")
    console.print(f"follow it with `ckd-orchestrate status {sweep.sweep_id}`, `ckd-orchestrate logs "
                  f"{sweep.sweep_id}`; stop it with `ckd-orchestrate cancel {sweep.sweep_id}`")
    print(sweep.sweep_id)
    return 0


def refresh_status(sweep: SweepDir, backend: Backend | None = None) -> tuple[dict[str, Any], JobStatus]:
    """Ask the backend about the sweep's job and apply what it says (the rules in the module docstring).

    Returns:
        (the sweep's state after the update, the backend's `JobStatus`).

    Raises:
        Exception: whatever the backend raises when it cannot be asked (see `backend_errors`).
    """
    backend = backend or backend_of(sweep)
    state = sweep.state()
    job = state.get("backend") or {}
    reported = backend.status(job) if job else JobStatus()
    if not backend.shares_sweep_dir and state.get("tracking_uri"):
        state = records.sync_from_mlflow(sweep, state["tracking_uri"])
    status = SweepStatus(state.get("status", SweepStatus.PENDING))
    new, why = None, {}
    if reported.requeued and status != SweepStatus.FINISHED:
        # Slurm's SIGTERM reaches the driver as the launcher notes the requeue: the driver may have recorded
        # itself cancelled or failed first; a requeued job continues the sweep, so it is pending, error-free.
        new, why = SweepStatus.PENDING, {"error": None}
    elif reported.state == SweepStatus.RUNNING and status == SweepStatus.PENDING:
        new = SweepStatus.RUNNING
    elif reported.state in (SweepStatus.FAILED, SweepStatus.CANCELLED) and status in _ACTIVE:
        new = reported.state
    if new is not None and (new != status or (why and state.get("error"))):
        state = sweep.set_status(new, **why)
    return state, reported


def show_status(sweep: SweepDir) -> None:
    """`status`: refresh the sweep's status from its backend, then print it with the trial table."""
    backend = backend_of(sweep)
    with backend_errors(backend.name, f"reading sweep {sweep.sweep_id}'s job"):
        state, reported = refresh_status(sweep, backend)
    print_status(sweep, state, reported)


def _job_active(reported: JobStatus) -> bool:
    """Whether the backend still has (or cannot rule out) a live job: a local driver that is gone reports
    nothing at all."""
    return reported.state is not None or bool(reported.line)


def resume(sweep: SweepDir, *, detach: bool) -> int:
    """Start the sweep's driver again (it restores Tune's state: finished trials stay finished)."""
    backend = backend_of(sweep)
    with backend_errors(backend.name, f"resuming sweep {sweep.sweep_id}"):
        state, reported = refresh_status(sweep, backend)
    status = SweepStatus(state.get("status", SweepStatus.PENDING))
    if status == SweepStatus.FINISHED:
        console.print(f"sweep {sweep.sweep_id} already finished")
        print_status(sweep, state, reported)
        return 0
    job = state.get("backend") or {}
    if status in _ACTIVE and _job_active(reported):
        where = f" on {backend.name} ({reported.line})" if reported.line else f" (pid {job.get('pid')})"
        console.print(f"sweep {sweep.sweep_id} is still {status}{where}", highlight=False)
        return 2
    grid = grid_of(sweep)
    if backend.name != "local":
        with backend_errors(backend.name, f"resuming sweep {sweep.sweep_id}"):
            job = _restart(sweep, grid, backend, job, status)
        console.print(f"resuming sweep [bold]{sweep.sweep_id}[/] on {backend.name}: job [bold]{job['job_id']}[/]")
        return 0
    console.print(f"resuming sweep [bold]{sweep.sweep_id}[/]")
    if detach:
        _restart(sweep, grid, backend, job, status)
        return 0
    return _run_here(sweep)


def grid_of(sweep: SweepDir) -> Any:
    """The sweep's GridSpec from sweep.json (imported here: status, logs and cancel never need the grid's models).

    Raises:
        SweepFileError: the recorded grid does not fit this version's schema (the issues listed).
    """
    from jobs.specbase import SpecError
    from orchestrator.grid import GridSpec

    try:
        return GridSpec.from_record(sweep.record())
    except SpecError as err:
        raise SweepFileError(f"{sweep.path / 'sweep.json'}: the recorded grid is not valid:\n{err}") from None


def _restart(sweep: SweepDir, grid: Any, backend: Backend, previous: Mapping[str, Any],
             status: SweepStatus) -> dict[str, Any]:
    """A new attempt of the sweep's driver: pending until the driver says it runs (so that a `cancel` in
    between stops the new job), back to `status` when the backend refuses the submission."""
    sweep.set_status(SweepStatus.PENDING)
    try:
        return start_driver(sweep, grid, backend, previous)
    except BaseException:
        sweep.set_status(status)
        raise


def cancel(sweep: SweepDir, timeout_s: float = 120.0) -> int:
    """Stop the sweep's job and mark the sweep cancelled."""
    backend = backend_of(sweep)
    state = sweep.state()
    if state.get("backend"):  # a requeued Slurm job reads pending again, whatever its driver recorded
        with backend_errors(backend.name, f"reading sweep {sweep.sweep_id}'s job"):
            state, _ = refresh_status(sweep, backend)
    status = SweepStatus(state.get("status", SweepStatus.PENDING))
    if status.is_terminal:
        console.print(f"sweep {sweep.sweep_id} is already {status}")
        return 0
    with backend_errors(backend.name, f"cancelling sweep {sweep.sweep_id}"):
        backend.cancel(state.get("backend") or {}, timeout_s)
    sweep.set_status(SweepStatus.CANCELLED, error=None)  # the driver's own exit error is not news here
    console.print(f"sweep {sweep.sweep_id} cancelled")
    return 0


def driver_log(sweep: SweepDir, tail: int | None) -> str | None:
    """The driver's log where the backend holds it (None: it is the sweep's own logs/driver.log)."""
    backend = backend_of(sweep)
    job = sweep.state().get("backend") or {}
    if not job:
        return None
    with backend_errors(backend.name, f"reading sweep {sweep.sweep_id}'s driver log"):
        return backend.logs(job, tail)

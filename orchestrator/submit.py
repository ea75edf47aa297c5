"""Submitting, following and stopping sweeps (the embedded `local` backend runs the driver here)."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table

from orchestrator.state import SweepDir, new_sweep_id

# Wide enough for the trial table when the output is a log file rather than a terminal.
console = Console(width=None if sys.stdout.isatty() else 160)


def create_sweep(grid: Any, grid_file: Path) -> SweepDir:
    from jobs import tracking

    sweep = SweepDir(grid.sweep_root / new_sweep_id(Path(grid_file).stem))
    sweep.create(grid_file, grid.to_dict(), tracking.git_commit(Path(__file__).resolve().parent.parent))
    return sweep


def _start_detached(sweep: SweepDir) -> int:
    sweep.log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(sweep.log_file, "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.driver", str(sweep.path)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    sweep.update_state(backend={"backend": "local", "pid": proc.pid, "detached": True})
    return proc.pid


def _run_here(sweep: SweepDir) -> int:
    from orchestrator.driver import run_sweep

    handler = logging.FileHandler(sweep.log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    sweep.update_state(backend={"backend": "local", "pid": os.getpid(), "detached": False})
    try:
        state = run_sweep(sweep)
    except KeyboardInterrupt:
        console.print(f"sweep {sweep.sweep_id} cancelled; `ckd-orchestrate resume {sweep.sweep_id}` continues it")
        return 130
    finally:
        logging.getLogger().removeHandler(handler)
    print_status(sweep)
    champion = state.get("champion") or {}
    console.print(f"[bold green]champion[/] {champion.get('uri')} = trial {champion.get('trial_id')} "
                  f"({champion.get('metric')} {champion.get('value', float('nan')):.4f})")
    console.print(f"pull it: ckd-orchestrate pull {champion.get('uri')} --dest ./champion")
    return 0


def submit(grid: Any, grid_file: Path, *, detach: bool) -> int:
    if grid.backend != "local":
        return _submit_remote(grid, grid_file)
    sweep = create_sweep(grid, grid_file)
    console.print(f"sweep [bold]{sweep.sweep_id}[/] in {sweep.path}")
    if detach:
        pid = _start_detached(sweep)
        console.print(f"running in the background (pid {pid}); follow it with `ckd-orchestrate status "
                      f"{sweep.sweep_id}` or `ckd-orchestrate logs {sweep.sweep_id}`")
        print(sweep.sweep_id)
        return 0
    return _run_here(sweep)


class RemoteSweeps(Protocol):
    """What a remote backend (`cluster/<backend>/sweeps.py`, class `Sweeps`) does for the CLI."""

    def submit(self, sweep: SweepDir, grid: Any) -> str:
        """Start the sweep's driver on the backend and return at once with the job's reference."""

    def describe(self, sweep: SweepDir) -> tuple[str, str | None]:
        """A line about the backend's job, and the sweep status it implies when the driver cannot tell."""

    def driver_log(self, sweep: SweepDir, tail: int | None) -> str | None:
        """The driver's log when it is not in the sweep directory on this machine (None: read it there)."""

    def cancel(self, sweep: SweepDir, timeout_s: float) -> None:
        """Stop the backend's job."""


REMOTE_BACKENDS = ("slurm", "ray", "kubernetes")


def remote_sweeps(backend: str) -> RemoteSweeps:
    if backend not in REMOTE_BACKENDS:
        raise ValueError(f"{backend!r} is not a remote backend ({', '.join(REMOTE_BACKENDS)})")
    return importlib.import_module(f"cluster.{backend}.sweeps").Sweeps()


@contextlib.contextmanager
def _backend_errors(backend: str, what: str) -> Iterator[None]:
    """A backend's failure (unreachable scheduler, a job it no longer knows) as one error line and exit 2."""
    try:
        yield
    except Exception as err:
        console.print(f"[red]error:[/] {what} ({backend}): {err}", highlight=False)
        raise SystemExit(2) from None


def _remote_backend_of(sweep: SweepDir) -> str | None:
    backend = (sweep.state().get("backend") or {}).get("backend")
    return backend if backend in REMOTE_BACKENDS else None


def _submit_remote(grid: Any, grid_file: Path) -> int:
    sweeps = remote_sweeps(grid.backend)
    sweep = create_sweep(grid, grid_file)
    try:
        job = sweeps.submit(sweep, grid)
    except Exception as err:
        sweep.update_state(status="failed", error=f"submission to {grid.backend} failed: {err}"[:2000])
        console.print(f"[red]error:[/] submitting sweep {sweep.sweep_id} to {grid.backend} failed: {err}",
                      highlight=False)
        return 1
    console.print(f"sweep [bold]{sweep.sweep_id}[/] in {sweep.path}; {grid.backend} job [bold]{job}[/]")
    console.print(f"follow it with `ckd-orchestrate status {sweep.sweep_id}`, `ckd-orchestrate logs "
                  f"{sweep.sweep_id}`; stop it with `ckd-orchestrate cancel {sweep.sweep_id}`")
    print(sweep.sweep_id)
    return 0


def resume(sweep: SweepDir, *, detach: bool) -> int:
    state = sweep.state()
    if state.get("status") == "running" and _alive(state):
        console.print(f"sweep {sweep.sweep_id} is still running (pid {state['backend']['pid']})")
        return 2
    if state.get("status") == "finished":
        console.print(f"sweep {sweep.sweep_id} already finished")
        print_status(sweep)
        return 0
    remote = _remote_backend_of(sweep)
    if remote:
        from orchestrator.driver import load_grid_of

        sweeps = remote_sweeps(remote)
        with _backend_errors(remote, f"resuming sweep {sweep.sweep_id}"):
            line, ended = sweeps.describe(sweep)
            if sweep.state().get("status") in ("pending", "running") and ended is None:
                console.print(f"sweep {sweep.sweep_id} is still {state.get('status')} on {remote} ({line})",
                              highlight=False)
                return 2
            job = sweeps.submit(sweep, load_grid_of(sweep))
        console.print(f"resuming sweep [bold]{sweep.sweep_id}[/] on {remote}: job [bold]{job}[/]")
        return 0
    console.print(f"resuming sweep [bold]{sweep.sweep_id}[/]")
    if detach:
        _start_detached(sweep)
        return 0
    return _run_here(sweep)


def _alive(state: dict[str, Any]) -> bool:
    pid = (state.get("backend") or {}).get("pid")
    return bool(pid) and _pid_alive(pid)


def cancel(sweep: SweepDir, timeout_s: float = 120.0) -> int:
    state = sweep.state()
    backend = state.get("backend") or {}
    if state.get("status") in ("finished", "failed", "cancelled"):
        console.print(f"sweep {sweep.sweep_id} is already {state['status']}")
        return 0
    remote = _remote_backend_of(sweep)
    if remote:
        with _backend_errors(remote, f"cancelling sweep {sweep.sweep_id}"):
            remote_sweeps(remote).cancel(sweep, timeout_s)
    elif _alive(state):
        pid = backend["pid"]
        if backend.get("detached"):
            os.killpg(pid, signal.SIGTERM)  # the driver and the Ray processes it started
        else:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(state) and time.monotonic() < deadline:
            time.sleep(1)
        if _alive(state) and backend.get("detached"):
            os.killpg(pid, signal.SIGKILL)
    if not remote:
        stop_local_ray(sweep)
    sweep.update_state(status="cancelled", error=None)  # the driver's own exit error is not news here
    console.print(f"sweep {sweep.sweep_id} cancelled")
    return 0


def stop_local_ray(sweep: SweepDir, sig: int = signal.SIGTERM) -> None:
    """Stop the Ray processes the sweep's local driver started (never any other Ray on the machine)."""
    pids = sweep.state().get("ray_pids") or []
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_pid_alive(pid) for pid in pids):
        time.sleep(0.5)
    for pid in pids:
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is gone for our purpose
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def print_status(sweep: SweepDir) -> None:
    from orchestrator.driver import load_grid_of
    from orchestrator.report import trials_table

    remote = _remote_backend_of(sweep)
    backend_line = None
    if remote:
        with _backend_errors(remote, f"reading sweep {sweep.sweep_id}'s job"):
            backend_line, implied = remote_sweeps(remote).describe(sweep)
        if implied and sweep.state().get("status") in ("pending", "running"):
            sweep.update_state(status=implied)
    state = sweep.state()  # after describe(): a backend may have filled in what its driver recorded remotely
    status = state.get("status")
    if status == "running" and not _alive(state) and (state.get("backend") or {}).get("backend") == "local":
        status = "stopped (driver not running; `resume` continues it)"
    console.print(f"sweep [bold]{sweep.sweep_id}[/]: {status}  ({sweep.path})")
    if backend_line:
        console.print(f"  {backend_line}", highlight=False)
    if state.get("error"):
        console.print(f"  error: {state['error']}", markup=False)
    if not state.get("parent_run_id"):
        return
    grid = load_grid_of(sweep)
    rows = trials_table(state["parent_run_id"], grid.metric_name, tracking_uri=state["tracking_uri"])
    table = Table(title=f"trials ({grid.metric_name}, {grid.metric_mode})")
    for column in ("trial", "label", "state", "step", grid.metric_name, "best", "params", "latency ms"):
        table.add_column(column, justify="right" if column in ("step", "best", "params", "latency ms") else "left")
    champion = (state.get("champion") or {}).get("run_id")
    for row in rows:
        progress = _trial_progress(sweep, row.get("trial_id"))
        table.add_row(
            str(row.get("trial_id") or ""), str(row.get("run_name") or "").split(" ", 1)[-1],
            str(row.get("status")) + (" *champion*" if row.get("run_id") == champion else ""),
            progress, _fmt(row.get("last_eval")), _fmt(row.get("metric")),
            f"{row['parameters']:,.0f}" if row.get("parameters") else "", _fmt(row.get("latency_ms"), 1))
    console.print(table)


def _trial_progress(sweep: SweepDir, trial_id: str | None) -> str:
    import json

    if not trial_id:
        return ""
    metrics = sweep.trial_dir(trial_id) / "metrics.json"
    if not metrics.is_file():
        return ""
    data = json.loads(metrics.read_text())
    history = data.get("history") or []
    return str(history[-1]["step"]) if history else ""


def _fmt(value: Any, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def print_logs(sweep: SweepDir, trial: str | None, tail: int | None) -> int:
    remote = _remote_backend_of(sweep)
    if trial is None and remote:
        with _backend_errors(remote, f"reading sweep {sweep.sweep_id}'s driver log"):
            text = remote_sweeps(remote).driver_log(sweep, tail)
        if text is not None:
            sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
            return 0
    path = sweep.log_file if trial is None else sweep.trial_dir(trial) / "job.log"
    if not path.is_file():
        console.print(f"[red]error:[/] no log at {path}", highlight=False)
        return 2
    lines = path.read_text(errors="replace").splitlines()
    sys.stdout.write("\n".join(lines[-tail:] if tail else lines) + "\n")
    return 0


def print_best(sweep: SweepDir) -> int:
    state = sweep.state()
    champion = state.get("champion")
    if not champion:
        console.print(f"sweep {sweep.sweep_id} has no champion yet (status: {state.get('status')})")
        return 1
    for key in ("uri", "version", "trial_id", "run_id", "metric", "value"):
        console.print(f"{key:>9}: {champion.get(key)}", highlight=False)
    return 0

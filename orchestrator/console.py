"""What the sweep commands print: the console, a sweep's status with its trial table, logs, the champion.

Rendering only: what to show comes from state.json, sweep.json and the backend's `JobStatus`
(orchestrator.control gathers them), so nothing here imports a backend, Ray or torch.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cluster.base import JobStatus, SweepStatus
from orchestrator import records
from orchestrator.state import SweepDir

__all__ = ["console", "print_best", "print_champion", "print_logs", "print_status"]

# Wide enough for the trial table when the output is a log file rather than a terminal.
console = Console(width=None if sys.stdout.isatty() else 160)


def print_status(sweep: SweepDir, state: Mapping[str, Any], job: JobStatus) -> None:
    """The sweep's status line, the backend's line about its job, an error, and the trial table."""
    status = state.get("status")
    if status == SweepStatus.RUNNING and job.state is None and not job.line:
        # Nothing runs the sweep and no backend speaks for it: its driver was killed.
        status = "stopped (driver not running; `resume` continues it)"
    console.print(f"sweep [bold]{sweep.sweep_id}[/]: {status}  ({sweep.path})")
    if job.line:
        console.print(f"  {job.line}", highlight=False)
    if state.get("error"):
        console.print(f"  error: {state['error']}", markup=False)
    if not state.get("parent_run_id"):
        return
    from orchestrator.report import trials_table  # MLflow: only once there are runs to show

    sweep_block = sweep.record()["grid"].get("sweep") or {}
    metric, mode = sweep_block.get("metric") or "eval/accuracy", sweep_block.get("mode") or "max"
    try:
        uri = records.stored_tracking_uri(state)
    except ValueError as err:  # stored without its credentials and no $MLFLOW_TRACKING_URI to complete it
        console.print(f"  trials: not shown ({err})", markup=False)
        return
    from mlflow.exceptions import MlflowException

    from jobs.storage import redact_uri, sqlite_path

    db = sqlite_path(uri) if uri else None
    if db is not None and not db.is_file():  # status reads the store: it never creates an empty one
        console.print(f"  trials: not shown (no MLflow store at {db})", markup=False)
        return
    try:
        rows = trials_table(state["parent_run_id"], metric, tracking_uri=uri)
    except MlflowException as err:
        first = (str(err.message).strip().splitlines() or [type(err).__name__])[0][:300]
        console.print(f"  trials: not shown (cannot read them from {redact_uri(uri or '')}: {first})",
                      markup=False, soft_wrap=True)
        return
    table = Table(title=f"trials ({metric}, {mode})")
    for column in ("trial", "label", "state", "step", metric, "best", "params", "latency ms"):
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
    if not trial_id:
        return ""
    metrics = sweep.trial_dir(trial_id) / "metrics.json"
    if not metrics.is_file():
        return ""
    try:
        history = json.loads(metrics.read_text()).get("history") or []
        return str(history[-1]["step"]) if history else ""
    except (OSError, ValueError, AttributeError, LookupError, TypeError):  # written by a trial as it runs
        return "?"


def _fmt(value: Any, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def print_logs(sweep: SweepDir, trial: str | None, tail: int | None, backend_text: str | None = None) -> int:
    """The driver's log (`backend_text` when the backend holds it, else logs/driver.log), or a trial's
    job.log; the last `tail` lines when given. Returns the exit code."""
    if trial is None and backend_text is not None:
        sys.stdout.write(backend_text if backend_text.endswith("\n") or not backend_text else backend_text + "\n")
        return 0
    path = sweep.log_file if trial is None else sweep.trial_dir(trial) / "job.log"
    if not path.is_file():
        console.print(f"[red]error:[/] no log at {escape(str(path))}", highlight=False, soft_wrap=True)
        return 2
    lines = path.read_text(errors="replace").splitlines()
    sys.stdout.write("\n".join(lines[-tail:] if tail else lines) + "\n")
    return 0


def print_best(sweep: SweepDir) -> int:
    """The champion record; exit code 1 while there is none."""
    state = sweep.state()
    champion = state.get("champion")
    if not champion:
        console.print(f"sweep {sweep.sweep_id} has no champion yet (status: {state.get('status')})")
        return 1
    for key in ("uri", "version", "trial_id", "run_id", "metric", "value"):
        console.print(f"{key:>9}: {champion.get(key)}", highlight=False)
    return 0


def print_champion(state: Mapping[str, Any]) -> None:
    """The closing lines of a sweep run in this process: the champion and how to pull it."""
    champion = state.get("champion") or {}
    console.print(f"[bold green]champion[/] {champion.get('uri')} = trial {champion.get('trial_id')} "
                  f"({champion.get('metric')} {champion.get('value', float('nan')):.4f})")
    console.print(f"pull it: ckd-orchestrate pull {champion.get('uri')} --dest ./champion")

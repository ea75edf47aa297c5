"""`ckd-orchestrate plan`: what can be checked without running, and what the sweep will be.

The backend's own checks and what it would hand its scheduler come from the backend interface
(`Backend.plan_problems`, `Backend.plan_text`), given the launch `submit` would build
(orchestrator.launch.plan_launch); nothing here knows a backend by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cluster.base import Backend, DriverLaunch, TrialShape, backend_class
from jobs.packaged import resolve_source
from jobs.storage import redact_uri, sqlite_path
from orchestrator.launch import plan_launch
from orchestrator.records import server_problem

# Measured on the project's 2-core CPU machine (docs/performance.md); only for the rough CPU estimate.
CPU_GFLOPS = 65.0


def _backend_launch(grid: Any) -> tuple[Backend, DriverLaunch]:
    """The grid's backend, and the driver's launch `submit` would hand it (placeholders for the sweep)."""
    backend = backend_class(grid.backend)(grid.cluster)
    return backend, plan_launch(grid, backend)


def _redacted(launch: DriverLaunch) -> DriverLaunch:
    """`launch` as `plan` prints it: its tracking URI without credentials."""
    env = {k: redact_uri(v) if k == "MLFLOW_TRACKING_URI" else v for k, v in launch.env.items()}
    return dataclasses.replace(launch, env=env, tracking_uri=redact_uri(launch.tracking_uri))


def trial_shape(grid: Any) -> TrialShape:
    """One trial's generic resources (`sweep.resources`), for the backend's fit checks."""
    from orchestrator.space import TRIAL_DRIVER_CPUS

    r = grid.sweep.resources
    return TrialShape(workers=r.workers, cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker,
                      driver_cpus=TRIAL_DRIVER_CPUS)


def _teacher_config(source: str) -> dict[str, Any] | None:
    try:
        path = Path(resolve_source(source)) / "config.json"
    except Exception:
        return None
    return json.loads(path.read_text()) if path.is_file() else None


def check_plan(grid: Any) -> list[str]:
    """Problems that stop the sweep before it starts: the teacher, the MLflow store, the resources."""
    problems = []
    job = grid.base_job
    source = job.teacher.source
    if _teacher_config(source) is None and (source.startswith(("package:", "/")) or Path(source).exists()):
        problems.append(f"job.teacher.source: {source!r} has no config.json")
    uri = grid.tracking_uri()
    if (db := sqlite_path(uri)) is not None:
        folder = db.parent
        probe = folder
        while not probe.exists():
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            problems.append(f"mlflow.tracking_uri: cannot create the SQLite store in {folder} (not writable)")
    elif (problem := server_problem(uri)) is not None:
        problems.append(f"mlflow.tracking_uri: the MLflow server {redact_uri(uri)} is not reachable ({problem})")
    backend, launch = _backend_launch(grid)
    problems += backend.plan_problems(trial_shape(grid), launch)  # the backend's own (ray: the dashboard answers)
    return problems


def _train_rows(job: Any) -> int | None:
    task = job.task
    if task.max_train_examples:
        return task.max_train_examples
    if task.dataset is not None and task.dataset.files and "train" in task.dataset.files:
        train = Path(task.dataset.files["train"])
        if train.suffix in (".csv", ".tsv", ".jsonl") and train.is_file():
            with open(train, "rb") as handle:
                return max(0, sum(1 for _ in handle) - (train.suffix != ".jsonl"))
        return None
    if task.glue_dir is not None:
        from jobs.glue import GLUE_LAYOUTS, match_task_dir

        folder = match_task_dir(task.glue_dir, task.glue)  # the folder the job reads
        train = None if folder is None else folder / GLUE_LAYOUTS[task.glue].files["train"]
        if train is not None and train.is_file():
            with open(train, "rb") as handle:
                return max(0, sum(1 for _ in handle) - 1)
    return None


def _encoder_params(config: dict[str, Any] | None) -> float | None:
    if not config:
        return None
    d, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    ffn = config.get("intermediate_size", 4 * (d or 0))
    return None if not d or not layers else layers * (4 * d * d + 2 * d * ffn)


def estimate(job: Any) -> dict[str, float | None]:
    """Optimizer steps and matmul FLOPs of one trial (upper bound: every sequence at max_length)."""
    t = job.training
    rows = _train_rows(job)
    steps = t.max_steps or (None if rows is None else t.epochs * math.ceil(rows / t.batch_size))
    teacher = _encoder_params(_teacher_config(job.teacher.source))
    s = job.student
    if s.from_teacher is not None and teacher is not None:
        student = teacher * len(s.from_teacher.layers) / _teacher_config(job.teacher.source)["num_hidden_layers"]
    elif s.architecture is not None:
        a = s.architecture
        student = a.num_layers * (4 * a.hidden_size ** 2 + 2 * a.hidden_size * a.intermediate_size)
    else:
        student = None
    flops = None
    if steps and teacher and student:
        flops = steps * t.batch_size * job.task.max_length * (2 * teacher + 6 * student)
    return {"steps": steps, "train_rows": rows, "teacher_params": teacher, "student_params": student, "flops": flops}


def _verbatim(text: str) -> None:
    """Scripts and manifests are printed as they are, never wrapped to the terminal width (copy-paste)."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def print_plan(grid: Any, problems: list[str], console: Console | None = None) -> None:
    from orchestrator.space import trial_label

    console = console or Console()
    s = grid.sweep
    console.print(f"[bold]grid[/] {grid.file}  backend [bold]{grid.backend}[/]  metric [bold]{grid.metric_name}[/] "
                  f"({grid.metric_mode})  search {s.search.algorithm}  scheduler {s.scheduler.kind}")
    configs = grid.trial_configs_for_plan()
    table = Table(title=f"{grid.total_trials()} trial(s)")
    table.add_column("#", justify="right")
    table.add_column("trial (swept values)", overflow="fold")
    table.add_column("steps", justify="right")
    table.add_column("GFLOP", justify="right")
    total_flops = 0.0
    for i, config in enumerate(configs):
        try:
            from orchestrator.space import Sampled

            fixed = {k: v for k, v in config.items() if not isinstance(v, Sampled)}
            est = estimate(grid.job_spec_for(fixed))
        except Exception:
            est = {"steps": None, "flops": None}
        total_flops += est["flops"] or 0.0
        table.add_row(str(i), trial_label(config), str(est["steps"] or "?"), f"{est['flops'] / 1e9:,.0f}" if est["flops"] else "?")
    console.print(table)
    r = s.resources
    line = (f"each trial: {r.workers} worker(s) x {r.cpus_per_worker:g} CPU"
            + (f" + {r.gpus_per_worker:g} GPU" if r.gpus_per_worker else "") + " (DeepSpeed data parallel)")
    backend, launch = _backend_launch(grid)
    if (capacity := backend.capacity()) is not None:  # trials share known resources: how many at once
        cpus, gpus = capacity
        line += f"; this machine: {cpus:g} CPUs, {gpus:g} GPUs -> {grid.concurrent_trials(cpus, gpus)} at a time"
    console.print(line)
    if total_flops:
        console.print(f"compute: ~{total_flops / 1e12:,.1f} TFLOP in all (upper bound, full-length sequences); "
                      f"~{total_flops / (CPU_GFLOPS * 1e9) / 60:,.0f} min of a 2-core CPU at {CPU_GFLOPS:g} GFLOP/s")
    console.print(f"MLflow: {redact_uri(grid.tracking_uri())}  experiment {grid.mlflow.experiment!r}  registry "
                  f"models:/{grid.mlflow.registered_model}@{grid.mlflow.alias}")
    console.print(f"sweep root: {grid.sweep_root}")
    for title, text in backend.plan_text(_redacted(launch)):  # what submit hands the scheduler, but for the sweep id
        console.print(f"{title}:")
        _verbatim(text.replace(launch.tracking_uri, redact_uri(launch.tracking_uri)) if launch.tracking_uri else text)
    if problems:
        console.print("[bold red]problems:[/]")
        for problem in problems:
            console.print(f"  {problem}", markup=False)
    else:
        console.print("[green]plan OK[/] — nothing submitted")

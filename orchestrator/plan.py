"""`ckd-orchestrate plan`: what can be checked without running, and what the sweep will be."""

from __future__ import annotations

import json
import math
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from jobs.storage import sqlite_path

# Measured on the project's 2-core CPU machine (docs/performance.md); only for the rough CPU estimate.
CPU_GFLOPS = 65.0


def _local_resources(grid: Any) -> tuple[float, float]:
    cluster = grid.cluster
    cpus = getattr(cluster, "num_cpus", None) or os.cpu_count() or 1
    gpus = getattr(cluster, "num_gpus", None)
    if gpus is None:
        try:
            import torch

            gpus = torch.cuda.device_count()
        except Exception:
            gpus = 0
    return float(cpus), float(gpus)


def _teacher_config(source: str) -> dict[str, Any] | None:
    from jobs.models import resolve_source

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
    elif uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5)
        except Exception as err:
            problems.append(f"mlflow.tracking_uri: the MLflow server {uri} is not reachable ({err})")
    if grid.backend in ("ray", "kubernetes"):  # the cluster's own checks (ray: the dashboard answers us)
        import importlib

        problems += importlib.import_module(f"cluster.{grid.backend}.sweeps").plan_problems(grid)
    if grid.backend == "local":
        cpus, gpus = _local_resources(grid)
        if grid.concurrent_trials(cpus, gpus) < 1:
            r = grid.sweep.resources
            problems.append(f"sweep.resources: a trial needs {r.cpus:g} CPUs and {r.gpus:g} GPUs; this machine "
                            f"offers {cpus:g} CPUs and {gpus:g} GPUs (set cluster.num_cpus to run more "
                            f"logical CPUs than cores, or lower cpus_per_worker)")
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
        from jobs.glue import GLUE_LAYOUTS

        layout = GLUE_LAYOUTS[task.glue]
        for folder in Path(task.glue_dir).iterdir():
            train = folder / layout.files.get("train", "train.tsv")
            if folder.is_dir() and train.is_file() and folder.name.lower().replace("-", "") == \
                    layout.folder.lower().replace("-", ""):
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
    from orchestrator.grid import trial_label

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
            from orchestrator.grid import Sampled

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
    if grid.backend == "local":
        cpus, gpus = _local_resources(grid)
        line += f"; this machine: {cpus:g} CPUs, {gpus:g} GPUs -> {grid.concurrent_trials(cpus, gpus)} at a time"
    console.print(line)
    if total_flops:
        console.print(f"compute: ~{total_flops / 1e12:,.1f} TFLOP in all (upper bound, full-length sequences); "
                      f"~{total_flops / (CPU_GFLOPS * 1e9) / 60:,.0f} min of a 2-core CPU at {CPU_GFLOPS:g} GFLOP/s")
    console.print(f"MLflow: {grid.tracking_uri()}  experiment {grid.mlflow.experiment!r}  registry "
                  f"models:/{grid.mlflow.registered_model}@{grid.mlflow.alias}")
    console.print(f"sweep root: {grid.sweep_root}")
    if grid.backend == "kubernetes":
        from cluster.kubernetes.manifest import render_rayjob, to_yaml
        from cluster.kubernetes.sweeps import sweep_manifest

        console.print("RayJob manifest:")
        try:  # what submit applies, but for the sweep id and the record it carries
            manifest = sweep_manifest(grid, "<sweep-id>", record="<sweep.json and grid.yaml of the sweep, as JSON>")
        except ValueError:  # a grid the pods cannot run: listed under problems below
            root = grid.cluster.storage.sweep_root
            manifest = render_rayjob(grid.cluster, sweep_id="<sweep-id>", sweep_dir=f"{root}/<sweep-id>")
        _verbatim(to_yaml(manifest))
    if grid.backend == "slurm":
        from cluster.slurm.backend import SlurmBackend

        sweep_dir = grid.sweep_root / "<sweep-id>"
        console.print("sbatch script:")
        _verbatim(SlurmBackend().sbatch_script(sweep_dir, grid.cluster))
        console.print("what the nodes run inside the allocation:")
        _verbatim(SlurmBackend.node_commands(sweep_dir, grid.cluster))
    if problems:
        console.print("[bold red]problems:[/]")
        for problem in problems:
            console.print(f"  {problem}", markup=False)
    else:
        console.print("[green]plan OK[/] — nothing submitted")

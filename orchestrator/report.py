"""The accuracy / size / latency front of a sweep: a table of its trials and a plot, logged to the parent run.

Reads the layout of docs/architecture.md, "MLflow layout": child runs of the parent with ``best/<name>`` (the metric
of each exported student), ``student/parameters`` and ``student/latency_ms``; swept values as
``trial.<key>`` params; the trial id as tag ``ckd.trial_id``.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from orchestrator.registry import best_metric_key, child_runs, client_for

__all__ = ["REPORT_ARTIFACT_DIR", "front_report", "pareto_front", "trials_table"]

REPORT_ARTIFACT_DIR = "report"  # artifact folder of the parent run that receives the plot and the table
_CSV_FIELDS = ("run_id", "run_name", "status", "trial_id", "metric_name", "metric", "parameters", "latency_ms",
               "latency_p90_ms", "pareto_size", "pareto_latency", "params")


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def trials_table(parent_run_id: str, metric: str, *, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """One row per child run of ``parent_run_id`` (oldest first).

    Row keys: ``run_id``, ``run_name``, ``status`` (MLflow run status), ``trial_id`` (tag
    ``ckd.trial_id``), ``metric_name`` (``best/<name>``), ``metric`` (its value, or None before the trial
    finished), ``last_eval`` (the latest ``eval/<name>``, for running trials), ``parameters``
    (``student/parameters``), ``latency_ms``, ``latency_p90_ms``, ``params`` (the swept ``trial.*``
    params, prefix removed).
    """
    key = best_metric_key(metric)
    eval_key = "eval/" + key.removeprefix("best/")
    rows = []
    for run in child_runs(parent_run_id, tracking_uri=tracking_uri):
        m = run.data.metrics
        parameters = _finite(m.get("student/parameters"))
        rows.append({
            "run_id": run.info.run_id,
            "run_name": run.info.run_name or run.info.run_id[:8],
            "status": run.info.status,
            "trial_id": run.data.tags.get("ckd.trial_id", ""),
            "metric_name": key,
            "metric": _finite(m.get(key)),
            "last_eval": _finite(m.get(eval_key)),
            "parameters": int(parameters) if parameters is not None else None,
            "latency_ms": _finite(m.get("student/latency_ms")),
            "latency_p90_ms": _finite(m.get("student/latency_p90_ms")),
            "params": {k.removeprefix("trial."): v for k, v in sorted(run.data.params.items())
                       if k.startswith("trial.")},
        })
    return rows


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, metric) points: True where no other point has cost <= and metric >= with one strict.

    Lower cost and higher metric are better (flip the sign of a metric to minimise).
    """
    flags = []
    for i, (cost, value) in enumerate(points):
        dominated = any(c <= cost and v >= value and (c < cost or v > value)
                        for j, (c, v) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def _front_flags(rows: list[dict[str, Any]], cost_key: str, sign: float) -> dict[str, bool]:
    usable = [r for r in rows if r["metric"] is not None and r[cost_key] is not None]
    flags = pareto_front([(float(r[cost_key]), sign * r["metric"]) for r in usable])
    return {r["run_id"]: f for r, f in zip(usable, flags)}


def _plot_panel(ax: Any, rows: list[dict[str, Any]], cost_key: str, flags: dict[str, bool], xlabel: str,
                ylabel: str, log_x: bool) -> None:
    usable = [r for r in rows if r["metric"] is not None and r[cost_key] is not None]
    if not usable:
        ax.text(0.5, 0.5, f"no trial has {ylabel} and {xlabel}", ha="center", va="center", transform=ax.transAxes)
    for on_front, style in ((False, dict(color="tab:gray", alpha=0.6, label="trial")),
                            (True, dict(color="tab:red", label="Pareto front"))):
        pts = [r for r in usable if flags.get(r["run_id"]) == on_front]
        if pts:
            ax.scatter([r[cost_key] for r in pts], [r["metric"] for r in pts], s=40, zorder=3, **style)
    front = sorted((r for r in usable if flags.get(r["run_id"])), key=lambda r: r[cost_key])
    if len(front) > 1:
        ax.step([r[cost_key] for r in front], [r["metric"] for r in front], where="post", color="tab:red",
                alpha=0.5, zorder=2)
    for r in usable:
        ax.annotate(r["run_name"], (r[cost_key], r["metric"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    costs = [float(r[cost_key]) for r in usable]
    if log_x and costs and min(costs) > 0 and max(costs) / min(costs) > 10:
        ax.set_xscale("log")
    if log_x:  # parameter counts: 4.1k, 22M
        from matplotlib.ticker import EngFormatter

        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.xaxis.set_minor_formatter(EngFormatter(sep=""))
    ax.margins(x=0.12, y=0.08)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if usable:
        ax.legend(fontsize=7, loc="lower right")


def front_report(parent_run_id: str, metric: str, out_path: str | os.PathLike, *, mode: str = "max",
                 tracking_uri: str | None = None, log_to_run: bool = True) -> Path:
    """Plot each trial's metric against student size and latency; write a CSV beside it; log both.

    Args:
        parent_run_id: the sweep's parent run.
        metric: ``eval/<name>`` (plotted as ``best/<name>``).
        out_path: the PNG (a ``.png`` suffix is added when missing); the CSV is ``<stem>.csv`` beside it.
        mode: "max" when higher is better (the front then favours higher metric), "min" otherwise.
        log_to_run: log the PNG and CSV to the parent run under ``report/``.

    Returns:
        The PNG path.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = Path(out_path).expanduser().resolve()
    if out.suffix.lower() != ".png":
        out = out.with_name(out.name + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = out.with_suffix(".csv")
    rows = trials_table(parent_run_id, metric, tracking_uri=tracking_uri)
    key = best_metric_key(metric)
    sign = 1.0 if mode == "max" else -1.0
    size_front = _front_flags(rows, "parameters", sign)
    latency_front = _front_flags(rows, "latency_ms", sign)

    fig, (ax_size, ax_lat) = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    try:
        _plot_panel(ax_size, rows, "parameters", size_front, "student parameters", key, log_x=True)
        _plot_panel(ax_lat, rows, "latency_ms", latency_front, "latency (ms, median per batch)", key, log_x=False)
        scored = sum(r["metric"] is not None for r in rows)
        fig.suptitle(f"sweep {parent_run_id[:8]}: {key} vs size and latency ({scored}/{len(rows)} trials scored)")
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)

    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({
                **{k: r[k] for k in ("run_id", "run_name", "status", "trial_id", "metric_name", "metric",
                                     "parameters", "latency_ms", "latency_p90_ms")},
                "pareto_size": size_front.get(r["run_id"], False),
                "pareto_latency": latency_front.get(r["run_id"], False),
                "params": ";".join(f"{k}={v}" for k, v in r["params"].items()),
            })
    if log_to_run:
        client: MlflowClient = client_for(tracking_uri)
        client.log_artifact(parent_run_id, str(out), artifact_path=REPORT_ARTIFACT_DIR)
        client.log_artifact(parent_run_id, str(csv_path), artifact_path=REPORT_ARTIFACT_DIR)
    return out

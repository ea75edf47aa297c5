"""GLUE evaluation metrics, computed locally with scikit-learn and scipy.

Metric kinds and the keys they return (every metric is "higher is better", mode "max"):

=================== ======================== ================ =====================================
kind                keys                     primary (sweep)  GLUE tasks
=================== ======================== ================ =====================================
"accuracy"          accuracy                 accuracy         SST-2, QNLI, RTE, WNLI, MNLI (per split)
"f1"                f1, accuracy             f1               MRPC, QQP
"mcc"               mcc                      mcc              CoLA
"pearson_spearman"  pearson, spearman        pearson          STS-B
=================== ======================== ================ =====================================

MNLI is scored once per dev split with the same keys; the caller prefixes the split name.

"f1" is the F1 of class 1 when there are at most two classes (as GLUE reports it for MRPC/QQP) and
the unweighted mean over the classes present otherwise.

Degenerate inputs never yield NaN, so a sweep scheduler always gets a number: MCC with a constant
prediction or constant labels is 0.0, Pearson/Spearman with a constant prediction or constant labels
(or fewer than two examples) are 0.0, and F1 with no positive predictions and no positive labels is
0.0. Non-finite predictions (a diverged model) raise ValueError rather than being scored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from jobs.glue import GLUE_TASKS, METRIC_MODE, PRIMARY_METRIC, TaskInfo, glue_task_key

__all__ = ["METRIC_KINDS", "compute_metrics", "metric_kind", "metric_mode", "primary_metric"]

METRIC_KINDS = tuple(PRIMARY_METRIC)


def metric_kind(task_or_kind: str | TaskInfo) -> str:
    """Resolves a GLUE task name (any spelling), a `TaskInfo`, or a metric kind to a metric kind.

    Raises:
        ValueError: neither a metric kind nor a GLUE task; the message lists both.
    """
    if isinstance(task_or_kind, TaskInfo):
        return task_or_kind.metric_kind
    if task_or_kind in PRIMARY_METRIC:
        return task_or_kind
    try:
        return GLUE_TASKS[glue_task_key(task_or_kind)].metric_kind
    except ValueError:
        raise ValueError(
            f"unknown task or metric kind {task_or_kind!r}; metric kinds: {list(METRIC_KINDS)}, "
            f"GLUE tasks: {list(GLUE_TASKS)}"
        ) from None


def primary_metric(task: str | TaskInfo) -> str:
    """The key of the metric a sweep optimises for this task ("mcc", "accuracy", "f1" or "pearson")."""
    return PRIMARY_METRIC[metric_kind(task)]


def metric_mode(task: str | TaskInfo) -> str:
    """ "max" for every supported task (all GLUE metrics are higher-is-better)."""
    metric_kind(task)
    return METRIC_MODE


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor; float() first because numpy has no bfloat16
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x
        x = x.numpy()
    arr = np.asarray(x)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(arr)).sum())} non-finite value(s)")
    return arr


def _class_ids(predictions: np.ndarray) -> np.ndarray:
    if predictions.ndim == 2 and predictions.shape[1] > 1:
        return predictions.argmax(axis=1)
    if predictions.ndim == 1 and predictions.dtype.kind in "iub":
        return predictions.astype(np.int64)
    raise ValueError(
        f"classification predictions must be (N, C>1) logits or (N,) integer class ids, "
        f"got shape {predictions.shape} and dtype {predictions.dtype}"
    )


def _correlation(fn: Any, x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0  # undefined; 0.0 = "no linear/rank relation" keeps the sweep metric numeric
    value = float(fn(x, y)[0])
    return 0.0 if np.isnan(value) else value


def compute_metrics(task_or_kind: str | TaskInfo, predictions: Any, labels: Any) -> dict[str, float]:
    """Scores predictions against gold labels.

    Args:
        task_or_kind: a GLUE task name ("cola", "SST-2", "mnli", ...), a `TaskInfo`, or a metric
            kind ("accuracy", "f1", "mcc", "pearson_spearman").
        predictions: numpy array or torch tensor. Classification: (N, C) logits (argmax is taken)
            or (N,) integer class ids. Regression: (N,) or (N, 1) scores.
        labels: (N,) gold class ids or scores.

    Returns:
        metric name -> value as a Python float (keys per kind in the module docstring).

    Raises:
        ValueError: unknown task/kind, empty or mismatched inputs, non-finite predictions.
    """
    kind = metric_kind(task_or_kind)
    preds = _to_numpy(predictions, "predictions")
    gold = _to_numpy(labels, "labels").reshape(-1)
    if kind == "pearson_spearman":
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.ndim != 1:
            raise ValueError(f"regression predictions must be (N,) or (N, 1), got shape {preds.shape}")
    else:
        num_columns = preds.shape[1] if preds.ndim == 2 else 0
        preds = _class_ids(preds)
        if gold.dtype.kind == "f" and not np.all(gold == np.round(gold)):
            raise ValueError("classification labels must be integer class ids")
    if preds.shape[0] != gold.shape[0]:
        raise ValueError(f"{preds.shape[0]} predictions but {gold.shape[0]} labels")

    if kind == "pearson_spearman":
        x, y = preds.astype(np.float64), gold.astype(np.float64)
        return {"pearson": _correlation(stats.pearsonr, x, y), "spearman": _correlation(stats.spearmanr, x, y)}
    gold = gold.astype(np.int64)
    accuracy = float(accuracy_score(gold, preds))
    if kind == "accuracy":
        return {"accuracy": accuracy}
    if kind == "mcc":
        if np.unique(preds).size < 2 or np.unique(gold).size < 2:
            return {"mcc": 0.0}
        return {"mcc": float(matthews_corrcoef(gold, preds))}
    num_classes = max(int(gold.max()) + 1, int(preds.max()) + 1, num_columns)
    if num_classes <= 2:
        f1 = f1_score(gold, preds, pos_label=1, average="binary", zero_division=0.0)
    else:
        f1 = f1_score(gold, preds, average="macro", zero_division=0.0)
    return {"f1": float(f1), "accuracy": accuracy}

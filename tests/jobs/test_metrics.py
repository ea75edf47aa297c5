"""jobs.metrics against hand computations (plain Python / textbook numpy formulas, never sklearn)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.glue import GLUE_TASKS, METRIC_NAMES, PRIMARY_METRIC, TaskInfo
from jobs.metrics import compute_metrics, metric_kind, metric_mode, primary_metric


def hand_accuracy(pred: list[int], gold: list[int]) -> float:
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def hand_f1(pred: list[int], gold: list[int], positive: int = 1) -> float:
    tp = sum(1 for p, g in zip(pred, gold) if p == positive and g == positive)
    fp = sum(1 for p, g in zip(pred, gold) if p == positive and g != positive)
    fn = sum(1 for p, g in zip(pred, gold) if p != positive and g == positive)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def hand_binary_mcc(pred: list[int], gold: list[int]) -> float:
    tp = sum(1 for p, g in zip(pred, gold) if p == 1 and g == 1)
    tn = sum(1 for p, g in zip(pred, gold) if p == 0 and g == 0)
    fp = sum(1 for p, g in zip(pred, gold) if p == 1 and g == 0)
    fn = sum(1 for p, g in zip(pred, gold) if p == 0 and g == 1)
    return (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))


def textbook_pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / np.sqrt((dx**2).sum() * (dy**2).sum()))


def average_ranks(values: list[float]) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return np.array(ranks)


def logits_for(classes: list[int], num_classes: int) -> np.ndarray:
    """Logits whose argmax is `classes`, with noise so argmax is what is tested."""
    rng = np.random.default_rng(0)
    out = rng.normal(size=(len(classes), num_classes))
    out[np.arange(len(classes)), classes] += 10.0
    return out


PRED = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]
GOLD = [1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 0]


def test_accuracy_from_logits() -> None:
    for task in ("sst2", "qnli", "rte", "wnli", "accuracy"):
        assert compute_metrics(task, logits_for(PRED, 2), np.array(GOLD)) == {"accuracy": hand_accuracy(PRED, GOLD)}


def test_mnli_three_class_accuracy() -> None:
    pred = [0, 1, 2, 2, 1, 0, 0]
    gold = [0, 1, 1, 2, 0, 0, 2]
    out = compute_metrics("mnli", torch.tensor(logits_for(pred, 3)), torch.tensor(gold))
    assert out == {"accuracy": pytest.approx(4 / 7)}


@pytest.mark.parametrize("task", ["mrpc", "qqp", "f1", "MRPC"])
def test_binary_f1_and_accuracy(task: str) -> None:
    out = compute_metrics(task, logits_for(PRED, 2), GOLD)
    # tp=5 (rows 0,3,5,8,10), fp=2 (rows 2,9), fn=2 (rows 4,7): F1 = 10/14.
    assert out["f1"] == pytest.approx(10 / 14) == pytest.approx(hand_f1(PRED, GOLD))
    assert out["accuracy"] == pytest.approx(hand_accuracy(PRED, GOLD))
    assert set(out) == {"f1", "accuracy"}


def test_macro_f1_for_more_than_two_classes() -> None:
    pred = [0, 1, 2, 2, 1, 0, 0, 2, 1]
    gold = [0, 1, 1, 2, 0, 0, 2, 2, 1]
    out = compute_metrics("f1", logits_for(pred, 3), gold)
    expected = sum(hand_f1(pred, gold, positive=c) for c in range(3)) / 3
    assert out["f1"] == pytest.approx(expected)


def test_mcc_binary_matches_textbook_formula() -> None:
    out = compute_metrics("cola", logits_for(PRED, 2), GOLD)
    assert out == {"mcc": pytest.approx(hand_binary_mcc(PRED, GOLD))}
    assert primary_metric("cola") == "mcc"


def test_mcc_multiclass_matches_gorodkin_formula() -> None:
    pred = [0, 1, 2, 2, 1, 0, 0, 2, 1, 1]
    gold = [0, 1, 1, 2, 0, 0, 2, 2, 1, 2]
    conf = np.zeros((3, 3))
    for p, g in zip(pred, gold):
        conf[g, p] += 1
    s, c = conf.sum(), np.trace(conf)
    p_k, t_k = conf.sum(axis=0), conf.sum(axis=1)
    expected = (c * s - p_k @ t_k) / math.sqrt((s**2 - p_k @ p_k) * (s**2 - t_k @ t_k))
    assert compute_metrics("mcc", np.array(pred), np.array(gold))["mcc"] == pytest.approx(expected)


def test_stsb_pearson_and_spearman() -> None:
    preds = np.array([0.1, 1.5, 2.2, 3.9, 2.0, 4.8, 0.7])
    gold = np.array([0.0, 1.0, 2.6, 3.0, 2.6, 5.0, 1.2])  # a tie in the gold scores
    out = compute_metrics("stsb", preds.reshape(-1, 1), gold)
    assert out["pearson"] == pytest.approx(textbook_pearson(preds, gold))
    expected_spearman = textbook_pearson(average_ranks(preds.tolist()), average_ranks(gold.tolist()))
    assert out["spearman"] == pytest.approx(expected_spearman)
    assert compute_metrics("pearson_spearman", torch.tensor(preds), torch.tensor(gold)) == pytest.approx(out)
    assert primary_metric("stsb") == "pearson"


def test_bfloat16_regression_predictions() -> None:
    preds = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.bfloat16)
    out = compute_metrics("stsb", preds, torch.tensor([1.0, 2.0, 3.0]))
    assert out["pearson"] == pytest.approx(textbook_pearson(np.array([1.0, 2, 4]), np.array([1.0, 2, 3])))


@pytest.mark.parametrize(
    ("task", "preds", "gold", "expected"),
    [
        ("cola", [1, 1, 1, 1], [0, 1, 0, 1], {"mcc": 0.0}),
        ("cola", [0, 1, 0, 1], [1, 1, 1, 1], {"mcc": 0.0}),
        ("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0], {"pearson": 0.0, "spearman": 0.0}),
        ("stsb", [1.0, 2.0, 3.0], [4.0, 4.0, 4.0], {"pearson": 0.0, "spearman": 0.0}),
        ("stsb", [1.0], [3.0], {"pearson": 0.0, "spearman": 0.0}),
        ("mrpc", [0, 0, 0], [0, 0, 0], {"f1": 0.0, "accuracy": 1.0}),
    ],
)
def test_degenerate_inputs_give_zero_not_nan(task: str, preds: list, gold: list, expected: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "constant input" warnings leak either
        assert compute_metrics(task, np.array(preds), np.array(gold)) == expected


def test_primary_metric_and_mode_for_every_glue_task() -> None:
    expected = {
        "cola": "mcc",
        "sst2": "accuracy",
        "mrpc": "f1",
        "qqp": "f1",
        "stsb": "pearson",
        "mnli": "accuracy",
        "qnli": "accuracy",
        "rte": "accuracy",
        "wnli": "accuracy",
    }
    assert {t: primary_metric(t) for t in GLUE_TASKS} == expected
    assert {metric_mode(t) for t in GLUE_TASKS} == {"max"}
    assert primary_metric("SST-2") == "accuracy" and primary_metric("STS-B") == "pearson"
    custom = TaskInfo("sentiment", ("text",), ("neg", "neu", "pos"), metric_kind="f1")
    assert primary_metric(custom) == "f1" and metric_kind(custom) == "f1"


def test_metric_names_are_what_compute_metrics_returns() -> None:
    # jobs.glue names the metrics without importing scikit-learn; the two tables must agree, in order.
    for kind, names in METRIC_NAMES.items():
        preds = np.array([0.0, 1.0, 2.0]) if kind == "pearson_spearman" else np.array([0, 1, 1])
        gold = preds if kind == "pearson_spearman" else np.array([0, 1, 0])
        assert tuple(compute_metrics(kind, preds, gold)) == names
    assert set(METRIC_NAMES) == set(PRIMARY_METRIC)


def test_eval_metric_names_per_task() -> None:
    assert GLUE_TASKS["mrpc"].eval_metric_names() == ("eval/f1", "eval/accuracy", "eval/loss")
    assert GLUE_TASKS["stsb"].eval_metric_names() == ("eval/pearson", "eval/spearman", "eval/loss")
    mnli = GLUE_TASKS["mnli"]
    assert mnli.eval_metric_names() == ("eval/accuracy", "eval/mismatched_accuracy", "eval/loss")
    assert mnli.eval_metric_key("validation_matched", "accuracy") == "eval/accuracy"
    assert mnli.eval_metric_key("validation_mismatched", "accuracy") == "eval/mismatched_accuracy"
    for task in GLUE_TASKS.values():  # the sweep metric is one of the reported ones
        assert f"eval/{task.primary_metric}" in task.eval_metric_names()
    custom = TaskInfo("x", ("text",), ("a", "b"), metric_kind="f1", dev_splits=("dev", "test"))
    assert custom.eval_metric_names() == ("eval/f1", "eval/accuracy", "eval/test_f1", "eval/test_accuracy", "eval/loss")


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown task or metric kind 'glue9'.*cola"):
        compute_metrics("glue9", np.zeros((2, 2)), [0, 1])
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        compute_metrics("sst2", np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="non-finite"):
        compute_metrics("stsb", np.array([1.0, np.nan]), [0.0, 1.0])
    with pytest.raises(ValueError, match=r"\(N, C>1\) logits"):
        compute_metrics("sst2", np.array([0.3, 0.9]), [0, 1])
    with pytest.raises(ValueError, match="empty"):
        compute_metrics("sst2", np.zeros((0, 2)), [])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=40),
)
def test_binary_metrics_property(pairs: list[tuple[int, int]]) -> None:
    pred = [p for p, _ in pairs]
    gold = [g for _, g in pairs]
    out = compute_metrics("mrpc", np.array(pred), np.array(gold))
    assert out["accuracy"] == pytest.approx(hand_accuracy(pred, gold))
    assert out["f1"] == pytest.approx(hand_f1(pred, gold))
    mcc = compute_metrics("cola", np.array(pred), np.array(gold))["mcc"]
    degenerate = len(set(pred)) < 2 or len(set(gold)) < 2
    assert mcc == (0.0 if degenerate else pytest.approx(hand_binary_mcc(pred, gold)))

"""Task definitions (`TaskInfo`, label encoding), the GLUE registry, and readers for the official GLUE TSVs.

Everything here is plain Python (no `datasets`, no `torch`) so that `jobs.metrics` and config
validation can import the registry cheaply. Column names in the output follow the Hugging Face
`nyu-mll/glue` schema (e.g. MRPC's `#1 String` becomes `sentence1`, MNLI's `sentence1` becomes
`premise`), so a dataset read from local TSVs and one read from the Hub look the same downstream.
"""

from __future__ import annotations

import csv
import logging
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The sweep metric of each metric kind; every GLUE metric is "higher is better".
PRIMARY_METRIC: dict[str, str] = {
    "accuracy": "accuracy",
    "f1": "f1",
    "mcc": "mcc",
    "pearson_spearman": "pearson",
}
METRIC_MODE = "max"
# The keys `jobs.metrics.compute_metrics` returns per metric kind, in its order (a test keeps the two
# equal). Kept here, not asked of jobs.metrics, so that naming a task's metrics (`plan`, grid checks)
# needs no scikit-learn or scipy.
METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "accuracy": ("accuracy",),
    "f1": ("f1", "accuracy"),
    "mcc": ("mcc",),
    "pearson_spearman": ("pearson", "spearman"),
}
EVAL_LOSS = "eval/loss"


@dataclass(frozen=True)
class TaskInfo:
    """What a job must know about a text classification or regression task.

    Args:
        name: task name (GLUE tasks use the Hub config names: "sst2", "stsb", ...).
        text_fields: the one or two text columns, in the order they are fed to the tokenizer.
        label_names: class names, index = label id; empty for regression.
        is_regression: the label is a float score (one output unit, MSE).
        metric_kind: one of "accuracy", "f1", "mcc", "pearson_spearman" (see `jobs.metrics`).
        dev_splits: names of the evaluation splits (MNLI has two).
    """

    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] = ()
    is_regression: bool = False
    metric_kind: str = "accuracy"
    dev_splits: tuple[str, ...] = ("validation",)

    def __post_init__(self) -> None:
        if len(self.text_fields) not in (1, 2):
            raise ValueError(f"task {self.name!r}: text_fields must name 1 or 2 columns, got {self.text_fields!r}")
        for reserved in ("label", "idx"):
            if reserved in self.text_fields:
                raise ValueError(f"task {self.name!r}: a text field may not be called {reserved!r}")
        if self.is_regression and self.label_names:
            raise ValueError(f"task {self.name!r}: a regression task has no label_names")
        if not self.is_regression and len(self.label_names) < 2:
            raise ValueError(f"task {self.name!r}: a classification task needs at least 2 label_names")
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"task {self.name!r}: duplicate label_names {self.label_names!r}")
        if self.metric_kind not in PRIMARY_METRIC:
            raise ValueError(
                f"task {self.name!r}: unknown metric_kind {self.metric_kind!r}; known: {sorted(PRIMARY_METRIC)}"
            )
        if not self.dev_splits or "train" in self.dev_splits:
            raise ValueError(f"task {self.name!r}: dev_splits must be non-empty and exclude 'train'")

    @property
    def num_labels(self) -> int:
        """Output units of the classification head (1 for regression)."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def primary_metric(self) -> str:
        """The metric a sweep maximises for this task."""
        return PRIMARY_METRIC[self.metric_kind]

    def eval_metric_key(self, split: str, name: str) -> str:
        """The Tune/MLflow key of metric `name` on dev split `split`: `eval/<name>` on the first dev split,
        `eval/<split>_<name>` on later ones (MNLI: `eval/mismatched_accuracy`)."""
        if split == self.dev_splits[0]:
            return f"eval/{name}"
        return f"eval/{split.removeprefix('validation_')}_{name}"

    def eval_metric_names(self) -> tuple[str, ...]:
        """Every metric key a job of this task reports at each evaluation: each metric of its kind on each
        dev split (named by `eval_metric_key`), then `eval/loss`."""
        names = METRIC_NAMES[self.metric_kind]
        return (*(self.eval_metric_key(split, n) for split in self.dev_splits for n in names), EVAL_LOSS)

    def encode_labels(self, values: Sequence[Any], where: Callable[[int], str]) -> list[Any]:
        """Maps raw labels to label ids (classification) or floats (regression).

        A classification label may be one of `label_names` or an integer id (int, integral float, or
        a string of digits, as GLUE's 0/1 columns are); names win if both could apply.

        Args:
            values: the raw labels of one split.
            where: row index -> location ("<file>, line 7") used in error messages.

        Raises:
            ValueError: a label is unknown or out of range (naming location, value and the label list),
                or a regression score is not a finite number.
        """
        if self.is_regression:
            scores = []
            for row, value in enumerate(values):
                try:
                    scores.append(float(value))
                except (TypeError, ValueError):
                    scores.append(math.nan)
                if not math.isfinite(scores[-1]):
                    raise ValueError(f"{where(row)}: label {value!r} is not a finite number (task {self.name!r})")
            return scores
        index = {name: i for i, name in enumerate(self.label_names)}
        ids = []
        for row, value in enumerate(values):
            label = None
            if isinstance(value, str):
                text = value.strip()
                label = index.get(text, int(text) if text.lstrip("-").isdigit() else None)
            elif isinstance(value, numbers.Integral | float) and not isinstance(value, bool):  # incl. numpy ints
                label = int(value) if float(value).is_integer() else None
            if label is None or not 0 <= label < len(index):
                raise ValueError(
                    f"{where(row)}: label {value!r} is not in the label list {list(self.label_names)} "
                    f"(nor an integer id 0..{len(index) - 1}) of task {self.name!r}"
                )
            ids.append(label)
        return ids


@dataclass(frozen=True)
class TsvLayout:
    """Where a GLUE task's fields sit in its official TSV files.

    Args:
        folder: canonical folder name in the GLUE distribution ("SST-2", "CoLA", ...).
        files: split name -> file name inside the folder.
        columns: for a headerless file, the names of its columns; None when the file has a header row.
        text_columns: file columns holding the text fields, aligned with `TaskInfo.text_fields`.
        label_column: file column holding the label (or score).
        skip_malformed: the official file has rows with missing fields that the reference
            implementation drops (QQP); elsewhere such a row is an error.
    """

    folder: str
    files: dict[str, str]
    columns: tuple[str, ...] | None
    text_columns: tuple[str, ...]
    label_column: str
    skip_malformed: bool = False


_DEV = {"train": "train.tsv", "validation": "dev.tsv"}

GLUE_TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in (
        TaskInfo("cola", ("sentence",), ("unacceptable", "acceptable"), metric_kind="mcc"),
        TaskInfo("sst2", ("sentence",), ("negative", "positive")),
        TaskInfo("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), metric_kind="f1"),
        TaskInfo("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), metric_kind="f1"),
        TaskInfo("stsb", ("sentence1", "sentence2"), is_regression=True, metric_kind="pearson_spearman"),
        TaskInfo(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            dev_splits=("validation_matched", "validation_mismatched"),
        ),
        TaskInfo("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
        TaskInfo("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
        # WNLI's file stores 0/1 where 1 means entailment, hence the unusual order.
        TaskInfo("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
    )
}

GLUE_LAYOUTS: dict[str, TsvLayout] = {
    "cola": TsvLayout("CoLA", _DEV, ("source", "label", "original_label", "sentence"), ("sentence",), "label"),
    "sst2": TsvLayout("SST-2", _DEV, None, ("sentence",), "label"),
    "mrpc": TsvLayout("MRPC", _DEV, None, ("#1 String", "#2 String"), "Quality"),
    "qqp": TsvLayout("QQP", _DEV, None, ("question1", "question2"), "is_duplicate", skip_malformed=True),
    "stsb": TsvLayout("STS-B", _DEV, None, ("sentence1", "sentence2"), "score"),
    "mnli": TsvLayout(
        "MNLI",
        {
            "train": "train.tsv",
            "validation_matched": "dev_matched.tsv",
            "validation_mismatched": "dev_mismatched.tsv",
        },
        None,
        ("sentence1", "sentence2"),
        "gold_label",
    ),
    "qnli": TsvLayout("QNLI", _DEV, None, ("question", "sentence"), "label"),
    "rte": TsvLayout("RTE", _DEV, None, ("sentence1", "sentence2"), "label"),
    "wnli": TsvLayout("WNLI", _DEV, None, ("sentence1", "sentence2"), "label"),
}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def glue_task_key(name: str) -> str:
    """Maps any spelling of a GLUE task ("SST-2", "sst2", "STS_B") to its registry key.

    Raises:
        ValueError: the name is not a GLUE task; the message lists the known ones.
    """
    key = _normalise(name)
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; known tasks: {', '.join(GLUE_TASKS)}")
    return key


def get_glue_task(name: str) -> TaskInfo:
    """The `TaskInfo` of a GLUE task, by any common spelling of its name."""
    return GLUE_TASKS[glue_task_key(name)]


def match_task_dir(glue_dir: str | Path, task: str) -> Path | None:
    """The folder of `task` inside a GLUE directory, or None when there is none (or no such directory).

    The one rule for matching a task folder, used wherever one is looked up (validation, the teacher cache
    key, reading, `plan`'s row count): the canonical folder name ("SST-2") compared case-insensitively and
    ignoring '-' and '_' ("sst2", "sst_2", "Sst-2" all match); of several matches the first by name.
    """
    root = Path(glue_dir)
    if not root.is_dir():
        return None
    wanted = _normalise(GLUE_LAYOUTS[glue_task_key(task)].folder)
    matches = sorted(p for p in root.iterdir() if p.is_dir() and _normalise(p.name) == wanted)
    return matches[0] if matches else None


def find_task_dir(glue_dir: str | Path, task: str) -> Path:
    """The folder of `task` inside a GLUE directory (matched by `match_task_dir`).

    Raises:
        FileNotFoundError: `glue_dir` or the task folder is missing; the message names both.
    """
    root = Path(glue_dir)
    layout = GLUE_LAYOUTS[glue_task_key(task)]
    if not root.is_dir():
        raise FileNotFoundError(
            f"GLUE directory {str(root)!r} does not exist or is not a directory "
            f"(expected a folder containing task folders such as {layout.folder}/)"
        )
    folder = match_task_dir(root, task)
    if folder is None:
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"no {layout.folder}/ folder in GLUE directory {str(root)!r} "
            f"(matched case-insensitively; found: {present or 'nothing'})"
        )
    return folder


def read_glue_tsv(path: str | Path, layout: TsvLayout) -> tuple[list[tuple[str, ...]], list[str], list[int]]:
    """Reads one official GLUE TSV file.

    The files are read with `utf-8-sig` (MRPC starts with a byte-order mark) and without quote
    handling, because some sentences contain unbalanced quote characters that would otherwise
    swallow the following lines.

    Args:
        path: the TSV file.
        layout: the task's column layout.

    Returns:
        (texts, labels, line_numbers): per kept row the text fields, the raw label string, and the
        1-based line number in the file (for error messages).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the header lacks a needed column, or a row has the wrong number of fields
            in a file where the official data has none.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"missing GLUE file {str(path)!r} (expected {', '.join(layout.files.values())} in {path.parent})"
        )
    texts: list[tuple[str, ...]] = []
    labels: list[str] = []
    lines: list[int] = []
    skipped = 0
    # Some MNLI/QQP fields exceed the csv module's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = layout.columns if layout.columns is not None else next(reader, None)
        if header is None:
            raise ValueError(f"GLUE file {str(path)!r} is empty (expected a header row)")
        missing = [c for c in (*layout.text_columns, layout.label_column) if c not in header]
        if missing:
            raise ValueError(f"GLUE file {str(path)!r}: header {list(header)} lacks column(s) {missing}")
        text_pos = [header.index(c) for c in layout.text_columns]
        label_pos = header.index(layout.label_column)
        first_line = 1 if layout.columns is not None else 2
        for line_no, row in enumerate(reader, start=first_line):
            if len(row) != len(header):
                if layout.skip_malformed:
                    skipped += 1
                    continue
                raise ValueError(
                    f"GLUE file {str(path)!r}, line {line_no}: expected {len(header)} tab-separated fields, "
                    f"got {len(row)}"
                )
            texts.append(tuple(row[i] for i in text_pos))
            labels.append(row[label_pos])
            lines.append(line_no)
    if skipped:
        msg = f"skipped {skipped} malformed row(s) in {str(path)!r} (expected {len(header)} fields per row)"
        log.warning(msg)
        warnings.warn(msg, stacklevel=2)
    return texts, labels, lines


@dataclass
class RawSplit:
    """One split's columns before label mapping: text field -> values, raw labels, and a row -> location
    function ("<file>, line 12") for error messages."""

    texts: dict[str, list[Any]]
    labels: list[Any]
    where: Callable[[int], str]


def read_glue_dir(glue_dir: str | Path, task: str) -> dict[str, RawSplit]:
    """Reads every split of a GLUE task from a directory in the official layout.

    Raises:
        FileNotFoundError: the directory, task folder or one of the task's files is missing; all
            files are checked before any is read so a half-copied directory fails at once.
    """
    info = get_glue_task(task)
    layout = GLUE_LAYOUTS[info.name]
    folder = find_task_dir(glue_dir, info.name)
    paths = {split: folder / name for split, name in layout.files.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"missing GLUE file(s) {missing} "
            f"(task {info.name!r} expects {', '.join(layout.files.values())} in {folder})"
        )
    raw = {}
    for split, path in paths.items():
        texts, labels, lines = read_glue_tsv(path, layout)
        raw[split] = RawSplit(
            {f: [t[j] for t in texts] for j, f in enumerate(info.text_fields)},
            labels,
            lambda i, path=path, lines=lines: f"{path}, line {lines[i]}",
        )
    return raw

"""Content checks before any model loads: a dataset task's local files (at validation: `plan`), and a job
started again in an output dir that holds another job's checkpoint (`changed_job`, at the job's start).

For each file of `task.dataset.files`: not empty, not a header without rows, UTF-8 text, the text fields
and the label column present, every label one of `label_names` (or an integer id) or, for regression, a
finite number; each problem names the file and, where it can, the line. Only a bounded prefix of a big
file is read (`MAX_CHECKED_BYTES`); the rest is checked when the job reads it (`jobs.data`). Results are
cached by the file's size and mtime, so a grid whose points share the files reads them once.

Only csv and json (and pyarrow's schema reader for parquet, when installed): `plan` stays light.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jobs.glue import TaskInfo

__all__ = ["MAX_CHECKED_BYTES", "changed_job", "check_data_file"]

# The prefix of a data file read at validation; a JSON document (.json) larger than this is not parsed.
MAX_CHECKED_BYTES = 4 << 20


def check_data_file(path: Path, info: TaskInfo, label_field: str) -> str | None:
    """The first problem of one data file for this task (a message naming the file), or None."""
    try:
        stat = path.stat()
    except OSError as err:
        return f"cannot read data file {str(path)!r}: {err.strerror or err}"
    return _check_cached(str(path), stat.st_size, stat.st_mtime_ns, info.text_fields, info.label_names,
                         info.is_regression, info.name, label_field)


@functools.lru_cache(maxsize=256)
def _check_cached(file: str, size: int, mtime_ns: int, text_fields: tuple[str, ...], label_names: tuple[str, ...],
                  regression: bool, task: str, label_field: str) -> str | None:
    del mtime_ns  # part of the cache key only
    info = TaskInfo(task, text_fields, label_names, regression, "pearson_spearman" if regression else "accuracy")
    path = Path(file)
    if size == 0:
        return f"data file {file!r} is empty"
    try:
        if path.suffix.lower() == ".parquet":
            return _check_parquet(path, info, label_field)
        with path.open("rb") as handle:
            raw = handle.read(MAX_CHECKED_BYTES + 1)
    except OSError as err:
        return f"cannot read data file {file!r}: {err.strerror or err}"
    complete = len(raw) <= MAX_CHECKED_BYTES
    suffix = path.suffix.lower()
    if not complete:  # the whole lines of the prefix; a JSON document or a line longer than it: not here
        cut = raw.rfind(b"\n")
        if suffix == ".json" or cut < 0:
            return None
        raw = raw[: cut + 1]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        return (f"data file {file!r} is not UTF-8 text: byte 0x{raw[err.start]:02x} on line {line} "
                f"(Latin-1?); save it as UTF-8")
    if not text.strip():
        return f"data file {file!r} is empty"
    if suffix == ".csv":
        return _check_csv(file, text, info, label_field, complete)
    if suffix == ".jsonl":
        return _check_json_lines(file, text, info, label_field)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        if suffix == ".json" and text.lstrip().startswith("{"):  # JSON Lines in a .json file
            return _check_json_lines(file, text, info, label_field)
        return f"data file {file!r} is not valid JSON: {err.msg} on line {err.lineno}"
    if isinstance(records, dict) and records and all(isinstance(v, list) for v in records.values()):
        columns = records
        count = max(len(v) for v in columns.values())
        rows = [{k: (v[i] if i < len(v) else None) for k, v in columns.items()} for i in range(count)]
        return _check_rows(file, rows, list(range(1, count + 1)), list(columns), info, label_field, "row")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return f"data file {file!r}: expected a list of JSON objects (one per example)"
    keys = list(dict.fromkeys(k for r in records for k in r))
    return _check_rows(file, records, list(range(1, len(records) + 1)), keys, info, label_field, "item")


def _check_csv(file: str, text: str, info: TaskInfo, label_field: str, complete: bool) -> str | None:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, lines = [], []
    try:
        header = reader.fieldnames
        for row in reader:
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as err:
        if complete:
            return f"data file {file!r}, line {reader.line_num}: not valid CSV ({err})"
    if not complete:  # the prefix may cut the last record (a quoted field over several lines)
        rows, lines = rows[:-1], lines[:-1]
        if not rows:
            return None
    if not header:
        return f"data file {file!r} is empty"
    if not rows:
        return f"data file {file!r} has a header but no rows"
    for row, line in zip(rows, lines):
        if None in row or None in row.values():
            return (f"data file {file!r}, line {line}: {'more' if None in row else 'fewer'} fields than the "
                    f"header's {len(header)}")
    return _check_rows(file, rows, lines, list(header), info, label_field, "line")


def _check_json_lines(file: str, text: str, info: TaskInfo, label_field: str) -> str | None:
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return f"data file {file!r}, line {number}: not valid JSON ({err.msg})"
        if not isinstance(record, dict):
            return f"data file {file!r}, line {number}: expected a JSON object, got {type(record).__name__}"
        rows.append(record)
        lines.append(number)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return _check_rows(file, rows, lines, keys, info, label_field, "line")


def _check_parquet(path: Path, info: TaskInfo, label_field: str) -> str | None:
    if importlib.util.find_spec("pyarrow") is None:
        return None
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as err:  # pyarrow's errors are many kinds; each means an unreadable file
        return f"data file {str(path)!r} is not a readable parquet file: {err}"
    missing = [c for c in (*info.text_fields, label_field) if c not in schema.names]
    if missing:
        return f"data file {str(path)!r}: missing column(s) {missing}; available: {list(schema.names)}"
    return f"data file {str(path)!r} has no rows" if rows == 0 else None


def _check_rows(file: str, rows: Sequence[dict[str, Any]], lines: Sequence[int], columns: Sequence[str],
                info: TaskInfo, label_field: str, unit: str) -> str | None:
    if not rows:
        return f"data file {file!r} has no rows"
    missing = [c for c in (*info.text_fields, label_field) if c not in columns]
    if missing:
        return f"data file {file!r}: missing column(s) {missing}; available: {list(columns)}"
    for row, line in zip(rows, lines):
        for name in info.text_fields:
            if not isinstance(row.get(name), str):
                value = row.get(name)
                what = "no value" if value is None else f"{type(value).__name__} {value!r}, not text"
                return f"data file {file!r}, {unit} {line}: text field {name!r} has {what}"
    where: Callable[[int], str] = lambda i: f"data file {file!r}, {unit} {lines[i]}"  # noqa: E731
    try:
        info.encode_labels([row.get(label_field) for row in rows], where)
    except ValueError as err:
        return str(err)
    return None


def changed_job(job_file: Path, new: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first key where the resolved spec `new` differs from the one recorded in `job_file` (a job's
    job.json), as (dotted key, recorded value, new value); None when they agree or nothing is recorded.

    `output.mlflow` (where results are reported, not what they are) is not compared, nor keys only one
    side has (a newer version's defaults)."""
    try:
        old = json.loads(job_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    flat_old, flat_new = _flat(old, ""), _flat(new, "")
    for key, value in flat_new.items():
        if key in flat_old and flat_old[key] != value and not key.startswith("output.mlflow."):
            return key, flat_old[key], value
    return None


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.loads(json.dumps(value, default=str))}

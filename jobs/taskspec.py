"""The `task:` section of a job spec: a GLUE task or a generic dataset, validated without loading a dataset.

    task: {glue: rte, glue_dir: ../glue}                  # local GLUE copy in the official layout
    task: {glue: sst2}                                    # GLUE from the Hub
    task: {dataset: {files: {train: a.csv, validation: b.jsonl}}, text_fields: [text], label_names: [neg, pos]}

Local data files are checked here too (a bounded prefix: columns, labels, UTF-8; `jobs.datacheck`).
`TaskSpec.task_info()` gives the task's `TaskInfo`; `TaskSpec.data_identity()` what determines its training
data, for cache keys. Loading the data is `jobs.data.task_source(task)`'s job, so this module stays light
(no `datasets`, no `torch`): config validation and `plan` import it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from jobs.datacheck import check_data_file
from jobs.glue import GLUE_LAYOUTS, GLUE_TASKS, PRIMARY_METRIC, TaskInfo, glue_task_key, match_task_dir
from jobs.specbase import Bool, Int, StrictModel, raise_if, resolve_path

__all__ = ["FILE_FORMATS", "HUB_ID", "DatasetSource", "TaskSpec", "files_fingerprint"]

# The local data file formats a dataset task may use (read by `jobs.data`).
FILE_FORMATS = (".csv", ".json", ".jsonl", ".parquet")
# A Hugging Face Hub id: "name" or "org/name".
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def files_fingerprint(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(name, size, mtime) per file: detects edits without reading the data; the directory itself is left
    out so the same files at another path (another node's copy with preserved mtimes) share the key."""
    out = []
    for p in sorted(paths):
        try:
            st = p.stat()
            out.append((p.name, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((p.name, -1, -1))
    return out


class DatasetSource(StrictModel):
    """A generic dataset: a Hub dataset (`hub`, optional `config`, `revision`, `splits`) or local files
    per split (`files: {train: a.csv, validation: b.jsonl}`). The shorthand `dataset: <hub id>` means
    `{hub: <hub id>}`. Split "train" is required; every other split is a dev split."""

    hub: str | None = None
    config: str | None = None
    revision: str | None = None
    splits: dict[str, str] | None = None
    files: dict[str, Path] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"hub": data} if isinstance(data, str) else data

    @field_validator("files", mode="before")
    @classmethod
    def _resolve_files(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, Mapping):
            return {k: resolve_path(v, info) for k, v in value.items()}
        return value

    @field_validator("files")
    @classmethod
    def _check_files(cls, value: dict[str, Path] | None) -> dict[str, Path] | None:
        if value is None:
            return value
        problems = []
        for split, path in value.items():
            if path.suffix.lower() not in FILE_FORMATS:
                problems.append((split, f"unsupported file {str(path)!r}; expected one of {', '.join(FILE_FORMATS)}"))
            elif not path.is_file():
                problems.append((split, f"data file {str(path)!r} does not exist"))
        raise_if(problems)
        return value

    @model_validator(mode="after")
    def _check(self) -> DatasetSource:
        problems = []
        if (self.hub is None) == (self.files is None):
            problems.append(("", "set exactly one of hub (a Hub dataset id) and files (split -> local file)"))
        if self.files is not None:
            for key in ("config", "revision", "splits"):
                if getattr(self, key) is not None:
                    problems.append((key, "only for a Hub dataset (dataset.hub)"))
        splits = self.files if self.files is not None else (self.splits or {"train": "train"})
        if "train" not in splits:
            problems.append(("files" if self.files is not None else "splits", f"no 'train' split among {list(splits)}"))
        if self.hub is not None and not HUB_ID.match(self.hub):
            problems.append(("hub", f"expected a Hub dataset id like 'org/name', got {self.hub!r}"))
        raise_if(problems)
        return self


class TaskSpec(StrictModel):
    """The task: a GLUE task (`glue`, optional local `glue_dir` in the official layout; the Hub otherwise)
    or a generic `dataset` with its fields, labels and metric."""

    glue: str | None = None
    glue_dir: Path | None = None
    dataset: DatasetSource | None = None
    name: str | None = Field(None, description="dataset tasks: name used in cache keys and logs")
    text_fields: list[str] | None = None
    label_field: str = "label"
    label_names: list[str] | None = None
    regression: Bool = False
    metric: str | None = Field(None, description="accuracy | f1 | mcc | pearson_spearman")
    max_train_examples: Int | None = Field(None, ge=1)
    max_eval_examples: Int | None = Field(None, ge=1)
    subset_seed: Int | None = Field(None, description="None keeps the first N rows; an int a seeded sample")
    max_length: Int = Field(128, ge=2)

    @field_validator("glue_dir", mode="before")
    @classmethod
    def _resolve_glue_dir(cls, value: Any, info: ValidationInfo) -> Any:
        return resolve_path(value, info)

    @field_validator("glue")
    @classmethod
    def _check_glue(cls, value: str | None) -> str | None:
        return None if value is None else glue_task_key(value)  # ValueError lists the known tasks

    @field_validator("metric")
    @classmethod
    def _check_metric(cls, value: str | None) -> str | None:
        if value is not None and value not in PRIMARY_METRIC:
            raise ValueError(f"unknown metric kind {value!r}; expected one of {', '.join(PRIMARY_METRIC)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        problems: list[tuple[str, str]] = []
        if (self.glue is None) == (self.dataset is None):
            problems.append(("", "set exactly one of glue (a GLUE task name) and dataset (a generic dataset)"))
            raise_if(problems)
        if self.glue is not None:
            # Defaults are accepted so that a dumped spec (`to_dict`) reads back.
            for key in ("name", "text_fields", "label_field", "label_names", "regression", "metric"):
                if getattr(self, key) != TaskSpec.model_fields[key].default:
                    problems.append((key, f"only for a dataset task; GLUE task {self.glue!r} defines it"))
            if self.glue_dir is not None:
                problems += self._check_glue_dir()
        else:
            if self.glue_dir is not None:
                problems.append(("glue_dir", "only for a GLUE task (task.glue)"))
            fields = self.text_fields or []
            if not 1 <= len(fields) <= 2:
                problems.append(("text_fields", f"expected 1 or 2 text column names, got {self.text_fields!r}"))
            elif len(set(fields)) != len(fields):
                problems.append(("text_fields", f"duplicate column names {fields!r}"))
            for reserved in ("label", "idx"):
                if reserved in fields:
                    problems.append(("text_fields", f"a text field may not be called {reserved!r}"))
            if self.label_field in fields:
                problems.append(("label_field", f"{self.label_field!r} is also a text field"))
            names = self.label_names or []
            if self.regression and self.label_names is not None:
                problems.append(("label_names", "a regression task has no label_names"))
            elif not self.regression and len(names) < 2:
                problems.append(("label_names", "a classification task needs at least 2 label names "
                                                "(or set regression: true)"))
            elif len(set(names)) != len(names):
                problems.append(("label_names", f"duplicate label names {names!r}"))
            if not problems:
                try:
                    info = self.task_info()
                except ValueError as err:
                    problems.append(("", str(err)))
                else:
                    problems += self._check_files(info)
        raise_if(problems)
        return self

    def _check_files(self, info: TaskInfo) -> list[tuple[str, str]]:
        """Each local data file's content (a bounded prefix): see jobs.datacheck."""
        files = self.dataset.files if self.dataset is not None else None
        out = []
        for split, path in (files or {}).items():
            problem = check_data_file(path, info, self.label_field)
            if problem:
                out.append((f"dataset.files.{split}", problem))
        return out

    def _check_glue_dir(self) -> list[tuple[str, str]]:
        root = self.glue_dir
        assert root is not None and self.glue is not None
        layout = GLUE_LAYOUTS[self.glue]
        if not root.is_dir():
            return [("glue_dir", f"GLUE directory {str(root)!r} does not exist "
                                 f"(expected a folder containing {layout.folder}/)")]
        folder = match_task_dir(root, self.glue)
        if folder is None:
            return [("glue_dir", f"no {layout.folder}/ folder in GLUE directory {str(root)!r}")]
        missing = [n for n in layout.files.values() if not (folder / n).is_file()]
        if missing:
            return [("glue_dir", f"{str(folder)!r} lacks {', '.join(missing)}")]
        return []

    @property
    def task_name(self) -> str:
        if self.glue is not None:
            return self.glue
        if self.name:
            return self.name
        if self.dataset is not None and self.dataset.hub:
            return self.dataset.hub.rsplit("/", 1)[-1]
        return "custom"

    def task_info(self) -> TaskInfo:
        """The task's `TaskInfo` (label names, metric, dev splits), without reading any data."""
        if self.glue is not None:
            return GLUE_TASKS[self.glue]
        assert self.dataset is not None
        splits = self.dataset.files if self.dataset.files is not None else (
            self.dataset.splits or {"train": "train", "validation": "validation"})
        kind = self.metric or ("pearson_spearman" if self.regression else "accuracy")
        dev = tuple(s for s in splits if s != "train")
        return TaskInfo(self.task_name, tuple(self.text_fields or ()), tuple(self.label_names or ()),
                        self.regression, kind, dev)

    def data_identity(self) -> dict[str, Any]:
        """What determines the training data (for cache keys): the source and row selection, not paths.
        Local files count by name, size and mtime (`files_fingerprint`), so an edited file changes it."""
        out: dict[str, Any] = {"task": self.task_name, "max_train_examples": self.max_train_examples,
                               "subset_seed": self.subset_seed, "max_length": self.max_length}
        if self.glue is not None:
            if self.glue_dir is None:
                out["hub"] = "nyu-mll/glue"
            else:
                # The folder the job reads (validation checked it exists); the GLUE directory itself when
                # it has gone since, whose missing files then fingerprint as (-1, -1).
                folder = match_task_dir(self.glue_dir, self.glue) or self.glue_dir
                out["files"] = files_fingerprint(folder / n for n in GLUE_LAYOUTS[self.glue].files.values())
        else:
            assert self.dataset is not None
            out.update(text_fields=self.text_fields, label_field=self.label_field, label_names=self.label_names,
                       regression=self.regression)
            if self.dataset.files is not None:
                out["files"] = {s: files_fingerprint([p]) for s, p in self.dataset.files.items()}
            else:
                out.update(hub=self.dataset.hub, config=self.dataset.config, revision=self.dataset.revision,
                           splits=self.dataset.splits)
        return out

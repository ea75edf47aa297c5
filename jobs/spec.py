"""`JobSpec`: one distillation job, read from YAML and validated without loading any model or data.

    task:      {glue: rte, glue_dir: ../glue}            # or dataset: <hub id> | {files: {train: ..}} + fields
    teacher:   {source: package:all-MiniLM-L6-v2, finetune: {epochs: 3}}
    student:   {from_teacher: {layers: [0, 5]}}           # or architecture: {...} or pretrained: <source>
    objective: {preset: ckd-paper}                        # the ckd/ config; task filled from task.glue
    training:  {epochs: 6, learning_rate: 5e-5}
    deepspeed: {zero_stage: 0, precision: fp32, config: {...raw DeepSpeed JSON, merged...}}
    output:    {dir: ../runs/rte, mlflow: {experiment: ckd-jobs}}

Entry points: `load_job_spec(path, overrides)` (YAML file + `a.b=value` overrides) and
`JobSpec.from_mapping(data, base_dir=...)`. Every problem (unknown key, wrong type, bad value, missing
path, objective error, DeepSpeed conflict) becomes one line "file:line: dotted.key: message" of a
single `SpecError`; all problems are collected and reported together.

Paths in the spec (task.glue_dir, task.dataset.files, teacher/student local directories, output.dir)
are resolved against the YAML file's directory (overrides included) and stored absolute, so the
resolved spec means the same thing in any worker's working directory.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo
from pydantic import field_validator, model_validator

import ckd
from jobs.glue import GLUE_LAYOUTS, GLUE_TASKS, PRIMARY_METRIC, TaskInfo, glue_task_key
from jobs.specbase import Problems, SpecError, SpecIssue, StrictModel, apply_overrides, line_of, raise_if
from jobs.specbase import read_yaml_mapping, resolve_path, validation_issues
from jobs.storage import tracking_uri_or_default

__all__ = [
    "ArchitectureStudent", "DatasetSource", "DeepSpeedSpec", "FinetuneSpec", "FromTeacherStudent", "JobSpec",
    "MlflowSpec", "OutputSpec", "SpecError", "SpecIssue", "StudentSpec", "TaskSpec", "TeacherSpec",
    "TrainingSpec", "load_job_spec",
]  # fmt: skip

DEFAULT_EXPERIMENT = "ckd-jobs"
MLFLOW_KEY_LIMIT = 250
MLFLOW_VALUE_LIMIT = 6000
# Bump when the meaning of the teacher cache key's inputs changes, so old cached teachers are never reused.
_TEACHER_CACHE_VERSION = 1
# Mirrors jobs.data.FILE_FORMATS (not imported: jobs.data pulls in `datasets`, seconds of start-up).
_FILE_FORMATS = (".csv", ".json", ".jsonl", ".parquet")


# --------------------------------------------------------------------------------------------- helpers


def _package_models() -> dict[str, tuple[str, str]]:
    from .packaged import PACKAGE_MODELS

    return dict(PACKAGE_MODELS)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _check_model_source(value: Any, info: ValidationInfo) -> str:
    """A model source: `package:<alias>`, an existing local directory (relative to the spec's
    directory; stored absolute), or a Hub id ("org/name")."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a Hub id, a local directory or package:<alias>, got {value!r}")
    value = value.strip()
    if value.startswith("package:"):
        alias = value.removeprefix("package:")
        known = _package_models()
        if known and alias not in known:
            raise ValueError(f"unknown packaged model {alias!r}; known: {', '.join(sorted(known))}")
        return value
    path = resolve_path(value, info)
    if path.exists() or value.startswith((".", "/", "~")) or not _HUB_ID.match(value):
        if not path.is_dir():
            raise ValueError(f"local model directory {str(path)!r} does not exist (nor is {value!r} a Hub id)")
        if not (path / "config.json").is_file():
            raise ValueError(f"local model directory {str(path)!r} has no config.json")
        return str(path)
    return value


def _source_config(source: str) -> dict[str, Any] | None:
    """The config.json of a local or packaged model source, or None (Hub ids are not fetched)."""
    try:
        if source.startswith("package:"):
            module_name = _package_models().get(source.removeprefix("package:"), (None,))[0]
            if module_name is None or importlib.util.find_spec(module_name) is None:
                return None
            path = Path(importlib.import_module(module_name).get_model_path())
        else:
            path = Path(source)
            if not path.is_absolute():
                return None
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError, AttributeError, ImportError):
        return None


def _raw_glue_name(info: ValidationInfo) -> str | None:
    """task.glue from the raw input when the task section itself failed validation (so the objective is
    still checked against the right task instead of reporting a misleading missing task)."""
    raw = (info.context or {}).get("raw")
    glue = raw.get("task", {}).get("glue") if isinstance(raw, Mapping) and isinstance(raw.get("task"), Mapping) else None
    try:
        return glue_task_key(glue) if isinstance(glue, str) else None
    except ValueError:
        return None


def _files_fingerprint(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
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


# ----------------------------------------------------------------------------------------------- models



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
            if path.suffix.lower() not in _FILE_FORMATS:
                problems.append((split, f"unsupported file {str(path)!r}; expected one of {', '.join(_FILE_FORMATS)}"))
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
        if self.hub is not None and not _HUB_ID.match(self.hub):
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
    regression: bool = False
    metric: str | None = Field(None, description="accuracy | f1 | mcc | pearson_spearman")
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)
    subset_seed: int | None = Field(None, description="None keeps the first N rows; an int a seeded sample")
    max_length: int = Field(128, ge=2)

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
                    self.task_info()
                except ValueError as err:
                    problems.append(("", str(err)))
        raise_if(problems)
        return self

    def _check_glue_dir(self) -> list[tuple[str, str]]:
        root = self.glue_dir
        assert root is not None and self.glue is not None
        layout = GLUE_LAYOUTS[self.glue]
        if not root.is_dir():
            return [("glue_dir", f"GLUE directory {str(root)!r} does not exist "
                                 f"(expected a folder containing {layout.folder}/)")]
        wanted = layout.folder.lower().replace("-", "")
        folders = [p for p in root.iterdir() if p.is_dir() and p.name.lower().replace("-", "").replace("_", "") == wanted]
        if not folders:
            return [("glue_dir", f"no {layout.folder}/ folder in GLUE directory {str(root)!r}")]
        missing = [n for n in layout.files.values() if not (folders[0] / n).is_file()]
        if missing:
            return [("glue_dir", f"{str(folders[0])!r} lacks {', '.join(missing)}")]
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

    def source(self) -> Any:
        """The `jobs.data` source (`GlueSource` or `CustomSource`) that loads this task's data."""
        from jobs.data import CustomSource, GlueSource

        if self.glue is not None:
            return GlueSource(self.glue, glue_dir=self.glue_dir)
        assert self.dataset is not None and self.text_fields is not None
        common = dict(name=self.task_name, text_fields=self.text_fields, label_names=self.label_names or (),
                      label_field=self.label_field, is_regression=self.regression, metric_kind=self.metric)
        if self.dataset.files is not None:
            return CustomSource(data_files=dict(self.dataset.files), **common)
        extra = {"hub_splits": self.dataset.splits} if self.dataset.splits else {}
        return CustomSource(hub_id=self.dataset.hub, hub_config=self.dataset.config,
                            revision=self.dataset.revision, **common, **extra)

    def _data_identity(self) -> dict[str, Any]:
        """What determines the training data (for cache keys): the source and row selection, not paths."""
        out: dict[str, Any] = {"task": self.task_name, "max_train_examples": self.max_train_examples,
                               "subset_seed": self.subset_seed, "max_length": self.max_length}
        if self.glue is not None:
            if self.glue_dir is None:
                out["hub"] = "nyu-mll/glue"
            else:
                folder = next((p for p in self.glue_dir.iterdir()
                               if p.is_dir() and p.name.lower().replace("-", "") ==
                               GLUE_LAYOUTS[self.glue].folder.lower().replace("-", "")), self.glue_dir)
                out["files"] = _files_fingerprint(folder / n for n in GLUE_LAYOUTS[self.glue].files.values())
        else:
            assert self.dataset is not None
            out.update(text_fields=self.text_fields, label_field=self.label_field, label_names=self.label_names,
                       regression=self.regression)
            if self.dataset.files is not None:
                out["files"] = {s: _files_fingerprint([p]) for s, p in self.dataset.files.items()}
            else:
                out.update(hub=self.dataset.hub, config=self.dataset.config, revision=self.dataset.revision,
                           splits=self.dataset.splits)
        return out


class FinetuneSpec(StrictModel):
    """Fine-tune the teacher on the task before distilling (cached by `JobSpec.teacher_cache_key`)."""

    epochs: int = Field(3, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs")
    seed: int = 42
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    # A teacher trained on more labelled rows than its students see (e.g. the whole split, while a
    # sweep distils on a subset): the setting in which distillation pays most. The rows are the first
    # N (or task.subset_seed's sample) of the same training split.
    max_train_examples: int | None = Field(None, ge=1, description="training rows for the teacher "
                                                                   "(default: task.max_train_examples)")


class TeacherSpec(StrictModel):
    """The teacher: Hub id, local directory or `package:all-MiniLM-L6-v2`; frozen during distillation."""

    source: str
    dtype: Literal["fp32", "bf16"] = "fp32"
    finetune: FinetuneSpec | None = None

    @field_validator("source", mode="before")
    @classmethod
    def _check_source(cls, value: Any, info: ValidationInfo) -> str:
        return _check_model_source(value, info)


class FromTeacherStudent(StrictModel):
    """Student = the teacher's embeddings + these (0-based, strictly increasing) teacher layers."""

    layers: list[int] = Field(min_length=1)
    copy_classifier: bool = True

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value) or any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"expected strictly increasing non-negative layer indices, got {value}")
        return value


class ArchitectureStudent(StrictModel):
    """A randomly initialised student of this shape (vocabulary and labels from the teacher)."""

    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)

    @model_validator(mode="after")
    def _check(self) -> ArchitectureStudent:
        if self.hidden_size % self.num_heads:
            raise Problems([("hidden_size", f"hidden_size ({self.hidden_size}) must be divisible by "
                                             f"num_heads ({self.num_heads})")])
        return self


_STUDENT_MODES = ("from_teacher", "architecture", "pretrained")


class StudentSpec(StrictModel):
    """Exactly one of `from_teacher`, `architecture`, `pretrained`."""

    from_teacher: FromTeacherStudent | None = None
    architecture: ArchitectureStudent | None = None
    pretrained: str | None = None

    @field_validator("pretrained", mode="before")
    @classmethod
    def _check_pretrained(cls, value: Any, info: ValidationInfo) -> Any:
        return None if value is None else _check_model_source(value, info)

    @model_validator(mode="before")
    @classmethod
    def _one_mode(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            given = [m for m in _STUDENT_MODES if data.get(m) is not None]
            if len(given) != 1:
                got = "none" if not given else " and ".join(given)
                raise Problems([("", f"expected exactly one of {', '.join(_STUDENT_MODES)}; got {got}")])
        return data

    @property
    def mode(self) -> str:
        return next(m for m in _STUDENT_MODES if getattr(self, m) is not None)


class TrainingSpec(StrictModel):
    """Distillation training. `batch_size` is the global effective batch (all processes x accumulation);
    `eval_batch_size` is per process."""

    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 disables clipping")
    grad_accumulation: int = Field(1, ge=1)
    seed: int = 42
    eval_every_steps: int | None = Field(None, ge=1, description="also evaluated at each epoch end")
    log_every_steps: int = Field(10, ge=1)
    checkpoint_every_steps: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> TrainingSpec:
        if self.batch_size % self.grad_accumulation:
            raise Problems([("batch_size", f"batch_size {self.batch_size} is not divisible by "
                                            f"grad_accumulation {self.grad_accumulation}")])
        return self


# DeepSpeed keys the job builds itself from training.* and must not come from the raw config.
_DS_RESERVED = {"optimizer": "the job builds the optimizer from training.learning_rate/weight_decay",
                "scheduler": "the job builds the schedule from training.warmup_ratio"}


class DeepSpeedSpec(StrictModel):
    """DeepSpeed settings. zero_stage defaults to 0 (plain data parallel): right on CPU and for small
    students; use 2 or 3 (+ offload_optimizer) for large models on GPUs. `config` is raw DeepSpeed JSON
    merged into the generated config; a raw value contradicting a generated one is an error."""

    zero_stage: int = Field(0, ge=0, le=3)
    offload_optimizer: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedSpec:
        problems = []
        if self.offload_optimizer and self.zero_stage == 0:
            problems.append(("offload_optimizer", "needs zero_stage >= 1"))
        for key, why in _DS_RESERVED.items():
            if key in self.config:
                problems.append((f"config.{key}", f"not allowed: {why}"))
        raise_if(problems)
        return self


class MlflowSpec(StrictModel):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///<output.dir>/mlflow.db")
    experiment: str = Field(DEFAULT_EXPERIMENT, min_length=1)
    run_name: str | None = None
    log_model: bool = True


class OutputSpec(StrictModel):
    dir: Path
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)

    @field_validator("dir", mode="before")
    @classmethod
    def _resolve_dir(cls, value: Any, info: ValidationInfo) -> Any:
        return resolve_path(value, info)

    def tracking_uri(self, env: Mapping[str, str] | None = None) -> str:
        """The explicit URI, else `env["MLFLOW_TRACKING_URI"]`, else SQLite beside the outputs."""
        return tracking_uri_or_default(self.mlflow.tracking_uri, env, self.dir / "mlflow.db")


class JobSpec(StrictModel):
    """One distillation job. Build with `load_job_spec` or `JobSpec.from_mapping`."""

    task: TaskSpec
    teacher: TeacherSpec
    student: StudentSpec
    objective: dict[str, Any]
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    output: OutputSpec

    _file: str = PrivateAttr("<spec>")
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)

    @field_validator("student")
    @classmethod
    def _check_student_depth(cls, value: StudentSpec, info: ValidationInfo) -> StudentSpec:
        teacher = info.data.get("teacher")
        if value.from_teacher is not None and teacher is not None:
            config = _source_config(teacher.source)
            depth = (config or {}).get("num_hidden_layers")
            if isinstance(depth, int) and value.from_teacher.layers[-1] >= depth:
                raise Problems([("from_teacher.layers", f"layer {value.from_teacher.layers[-1]} out of range "
                                                         f"for the {depth}-layer teacher (0-based)")])
        return value

    @field_validator("objective", mode="before")
    @classmethod
    def _check_objective(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, Mapping):
            return value  # pydantic reports the type
        value = dict(value)
        if value.get("preset") is not None and "task" not in value:
            task = info.data.get("task")
            glue = task.glue if task is not None else _raw_glue_name(info)
            if glue:
                value["task"] = glue
        try:
            ckd.resolve_terms(value)
        except ckd.ObjectiveConfigError as err:
            raise Problems([(err.key, err.message)]) from None
        return value

    @field_validator("deepspeed")
    @classmethod
    def _check_deepspeed(cls, value: DeepSpeedSpec, info: ValidationInfo) -> DeepSpeedSpec:
        training = info.data.get("training")
        if training is not None:
            ours = _deepspeed_ours(value, training, world_size=None)
            conflicts = _conflicts(value.config, ours)
            raise_if([(f"config.{key}", msg) for key, msg in conflicts])
        return value

    # ------------------------------------------------------------------------------------ construction

    @classmethod
    def from_mapping(cls, data: Any, *, base_dir: str | Path | None = None, file: str | Path | None = None,
                     lines: Mapping[str, int] | None = None, overridden: Mapping[str, str] | None = None,
                     env: Mapping[str, str] | None = None) -> JobSpec:
        """Validate a plain mapping (e.g. a YAML document, or a sweep trial's config).

        Args:
            data: the spec as nested mappings.
            base_dir: relative paths are resolved against it (default: the current directory).
            file: named in error messages.
            lines: dotted key -> 1-based line, for error messages (see `load_job_spec`).
            overridden: dotted key -> the override that set it, named in errors instead of a line.
            env: when given, an unset output.mlflow.tracking_uri is resolved from it (the edge).

        Raises:
            SpecError: every problem, one line each.
        """
        file_name = str(file) if file is not None else "<spec>"
        lines = dict(lines or {})
        context = {"base_dir": Path(base_dir) if base_dir is not None else Path.cwd(), "raw": data}
        try:
            spec = cls.model_validate(data, context=context)
        except ValidationError as err:
            raise SpecError(validation_issues(err, root=JobSpec, file=file_name, lines=lines, overridden=overridden)) from None
        spec._file, spec._lines = file_name, lines
        if env is not None and spec.output.mlflow.tracking_uri is None:
            spec.output.mlflow.tracking_uri = spec.output.tracking_uri(env)
        return spec

    def _error(self, key: str, message: str) -> SpecError:
        return SpecError([SpecIssue(self._file, line_of(self._lines, key), key, message)])

    # ----------------------------------------------------------------------------------------- derived

    def resolved_objective(self) -> dict[str, dict[str, Any]]:
        """The objective's terms with the preset expanded ({name: {kind, options...}})."""
        return ckd.resolve_terms(self.objective)

    def teacher_train_examples(self) -> int | None:
        """Training rows the teacher is fine-tuned on (None: all)."""
        ft = self.teacher.finetune
        if ft is not None and ft.max_train_examples is not None:
            return ft.max_train_examples
        return self.task.max_train_examples

    def teacher_cache_key(self) -> str:
        """Hex digest of everything that determines the (fine-tuned) teacher: its source, the fine-tuning
        settings (incl. seed), the task's data (source, fields, labels, row selection; local files by
        name/size/mtime, not by path) and max_length. Teacher dtype is applied when loading, so it is
        not part of the key."""
        source: Any = self.teacher.source
        if source.startswith("package:"):
            source = [source, _package_models().get(source.removeprefix("package:"), [None, None])[1]]
        elif Path(source).is_absolute():
            source = {"local": _files_fingerprint(p for p in Path(source).iterdir() if p.is_file())}
        info = self.task.task_info()
        ft = self.teacher.finetune
        payload = {
            "version": _TEACHER_CACHE_VERSION,
            "teacher": source,
            "finetune": None if ft is None else ft.model_dump(mode="json", exclude={"max_train_examples"}),
            "data": {**self.task._data_identity(), "max_train_examples": self.teacher_train_examples()},
            "labels": list(info.label_names),
            "regression": info.is_regression,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def deepspeed_config(self, world_size: int) -> dict[str, Any]:
        """The DeepSpeed config for `world_size` processes: our keys (batch sizes, accumulation, clipping,
        ZeRO stage/offload, precision) merged with `deepspeed.config`. No optimizer/scheduler keys: the
        job builds those.

        Raises:
            SpecError: training.batch_size does not split evenly into world_size x grad_accumulation micro
                batches, or raw config values contradict generated ones (all listed).
        """
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        t = self.training
        if t.batch_size % (world_size * t.grad_accumulation):
            raise self._error("training.batch_size", (
                f"global batch {t.batch_size} does not split into {world_size} process(es) x "
                f"{t.grad_accumulation} accumulation step(s) (micro batch would be "
                f"{t.batch_size / (world_size * t.grad_accumulation):g}); use a multiple of "
                f"{world_size * t.grad_accumulation}"))
        ours = _deepspeed_ours(self.deepspeed, t, world_size)
        conflicts = _conflicts(self.deepspeed.config, ours)
        if conflicts:
            raise SpecError([SpecIssue(self._file, line_of(self._lines, f"deepspeed.config.{k}"),
                                       f"deepspeed.config.{k}", m) for k, m in conflicts])
        return _merge(self.deepspeed.config, ours)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as JSON-compatible data (absolute paths); `from_mapping` reads it back."""
        return self.model_dump(mode="json")

    def flat_params(self) -> dict[str, str]:
        """The resolved spec flattened to dotted keys for MLflow params (unset options left out, lists and
        empty mappings as compact JSON), plus the expanded objective as `objective_terms.<term>.<option>` and
        `teacher.cache_key`. Keys are cut to 250 and values to 6000 characters
        (a hash suffix keeps cut keys distinct and marks cut values)."""
        flat: dict[str, str] = {}
        _flatten(self.to_dict(), "", flat)
        _flatten(self.resolved_objective(), "objective_terms", flat)
        flat["teacher.cache_key"] = self.teacher_cache_key()
        out = {}
        for key, value in flat.items():
            out[_truncate(key, MLFLOW_KEY_LIMIT)] = _truncate(value, MLFLOW_VALUE_LIMIT)
        return out


# --------------------------------------------------------------------------------------------- DeepSpeed

# Generated DeepSpeed key -> the spec key it comes from (named in conflict messages).
_DS_ORIGIN = {
    "train_batch_size": "training.batch_size",
    "train_micro_batch_size_per_gpu": "training.batch_size / (world_size x training.grad_accumulation)",
    "gradient_accumulation_steps": "training.grad_accumulation",
    "gradient_clipping": "training.grad_clip",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
    "bf16.enabled": "deepspeed.precision",
    "fp16.enabled": "deepspeed.precision",
}


def _deepspeed_ours(ds: DeepSpeedSpec, training: TrainingSpec, world_size: int | None) -> dict[str, Any]:
    ours: dict[str, Any] = {
        "train_batch_size": training.batch_size,
        "gradient_accumulation_steps": training.grad_accumulation,
        "gradient_clipping": training.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
    }
    if world_size is not None:
        ours["train_micro_batch_size_per_gpu"] = training.batch_size // (world_size * training.grad_accumulation)
    if ds.zero_stage >= 1:
        ours["zero_optimization"]["offload_optimizer"] = {"device": "cpu" if ds.offload_optimizer else "none"}
    return ours


def _conflicts(raw: Mapping[str, Any], ours: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Raw keys whose value differs from ours ("auto" defers to ours); nested mappings compared key by key."""
    out = []
    for key, value in ours.items():
        if key not in raw:
            continue
        dotted = f"{prefix}{key}"
        theirs = raw[key]
        if isinstance(value, Mapping):
            if isinstance(theirs, Mapping):
                out += _conflicts(theirs, value, f"{dotted}.")
            else:
                out.append((dotted, f"expected a mapping (the job sets {json.dumps(value)}), got {theirs!r}"))
        elif theirs != "auto" and (theirs != value or isinstance(theirs, bool) != isinstance(value, bool)):
            origin = _DS_ORIGIN.get(dotted, "the spec")
            out.append((dotted, f"raw value {theirs!r} conflicts with {value!r} set from {origin}; "
                                f"remove it, set it to 'auto', or change {origin.split(' ')[0]}"))
    return out


def _merge(raw: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, Any]:
    merged = json.loads(json.dumps(raw))  # a deep copy of plain JSON data
    for key, value in ours.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ------------------------------------------------------------------------------------------- flattening


def _flatten(value: Any, prefix: str, out: dict[str, str]) -> None:
    if value is None:
        return  # an unset option: a column of "null"s in MLflow's run list says nothing
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, str):
        out[prefix] = value
    else:
        out[prefix] = json.dumps(value, separators=(",", ":"), default=str)


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    marker = f"...[{digest}]"
    return text[: limit - len(marker)] + marker


# --------------------------------------------------------------------------------------------- loading


def load_job_spec(path: str | Path, overrides: Sequence[str] = (), env: Mapping[str, str] | None = None) -> JobSpec:
    """Read, override and validate a job spec YAML file.

    Args:
        path: the YAML file; relative paths inside it are resolved against its directory.
        overrides: `dotted.key=value` strings applied before validation (e.g. "training.learning_rate=3e-5",
            "student.from_teacher.layers=[0,5]").
        env: where an unset output.mlflow.tracking_uri comes from (default: os.environ).

    Raises:
        SpecError: the file is missing or unreadable, bad YAML, a bad override, or an invalid spec; the
            message names the file, the dotted key, the line and what was expected, one line per problem.
    """
    path = Path(path)
    file = str(path)
    data, lines = read_yaml_mapping(path, "job spec")
    data, overridden = apply_overrides(data, overrides, file)
    return JobSpec.from_mapping(data, base_dir=path.resolve().parent, file=file, lines=lines,
                                overridden=overridden, env=os.environ if env is None else env)



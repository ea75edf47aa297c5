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

The `task:` section lives in `jobs.taskspec`, the `deepspeed:` section and the DeepSpeed config generated
from it in `jobs.deepspeed_config`, and the strict-config machinery (errors, YAML with line numbers,
overrides) in `jobs.specbase`.

Paths in the spec (task.glue_dir, task.dataset.files, teacher/student local directories, output.dir)
are resolved against the YAML file's directory (overrides included) and stored absolute, so the
resolved spec means the same thing in any worker's working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from ckd.config import check_depths, resolve_terms
from ckd.errors import ObjectiveConfigError
from jobs.deepspeed_config import DeepSpeedSpec, config_conflicts, generated_config, merge_config
from jobs.glue import glue_task_key
from jobs.packaged import model_limits, source_config
from jobs.specbase import Bool, Float, Int, Problems, SpecError, SpecIssue, StrictModel, apply_overrides, line_of
from jobs.specbase import raise_if, read_yaml_mapping, resolve_path, validation_issues
from jobs.storage import redact_tracking_uris, tracking_uri_or_default
from jobs.taskspec import HUB_ID, TaskSpec, files_fingerprint

__all__ = [
    "ArchitectureStudent", "FinetuneSpec", "FromTeacherStudent", "JobSpec", "MlflowSpec", "OutputSpec",
    "StudentSpec", "TeacherSpec", "TrainingSpec", "load_job_spec",
]  # fmt: skip

DEFAULT_EXPERIMENT = "ckd-jobs"
MLFLOW_KEY_LIMIT = 250
MLFLOW_VALUE_LIMIT = 6000
# Bump when the meaning of the teacher cache key's inputs changes, so old cached teachers are never reused.
_TEACHER_CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------- helpers


def _package_models() -> dict[str, tuple[str, str]]:
    from .packaged import PACKAGE_MODELS

    return dict(PACKAGE_MODELS)


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
    if path.exists() or value.startswith((".", "/", "~")) or not HUB_ID.match(value):
        if not path.is_dir():
            raise ValueError(f"local model directory {str(path)!r} does not exist (nor is {value!r} a Hub id)")
        if not (path / "config.json").is_file():
            raise ValueError(f"local model directory {str(path)!r} has no config.json")
        return str(path)
    return value


def _raw_glue_name(info: ValidationInfo) -> str | None:
    """task.glue from the raw input when the task section itself failed validation (so the objective is
    still checked against the right task instead of reporting a misleading missing task)."""
    raw = (info.context or {}).get("raw")
    glue = raw.get("task", {}).get("glue") if isinstance(raw, Mapping) and isinstance(raw.get("task"), Mapping) else None
    try:
        return glue_task_key(glue) if isinstance(glue, str) else None
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------- models


class FinetuneSpec(StrictModel):
    """Fine-tune the teacher on the task before distilling (cached by `JobSpec.teacher_cache_key`)."""

    epochs: Int = Field(3, ge=1)
    learning_rate: Float = Field(2e-5, gt=0)
    batch_size: Int = Field(32, ge=1)
    max_steps: Int | None = Field(None, ge=1, description="overrides epochs")
    seed: Int = 42
    warmup_ratio: Float = Field(0.1, ge=0, lt=1)
    # A teacher trained on more labelled rows than its students see (e.g. the whole split, while a
    # sweep distils on a subset): the setting in which distillation pays most. The rows are the first
    # N (or task.subset_seed's sample) of the same training split.
    max_train_examples: Int | None = Field(None, ge=1, description="training rows for the teacher "
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

    layers: list[Int] = Field(min_length=1)
    copy_classifier: Bool = True

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value) or any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"expected strictly increasing non-negative layer indices, got {value}")
        return value


class ArchitectureStudent(StrictModel):
    """A randomly initialised student of this shape (vocabulary and labels from the teacher)."""

    num_layers: Int = Field(ge=1)
    hidden_size: Int = Field(ge=1)
    num_heads: Int = Field(ge=1)
    intermediate_size: Int = Field(ge=1)

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

    epochs: Int = Field(3, ge=1)
    max_steps: Int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: Int = Field(32, ge=1)
    eval_batch_size: Int = Field(64, ge=1)
    learning_rate: Float = Field(5e-5, gt=0)
    weight_decay: Float = Field(0.01, ge=0)
    warmup_ratio: Float = Field(0.1, ge=0, lt=1)
    grad_clip: Float = Field(1.0, ge=0, description="max gradient norm; 0 disables clipping")
    grad_accumulation: Int = Field(1, ge=1)
    seed: Int = 42
    eval_every_steps: Int | None = Field(None, ge=1, description="also evaluated at each epoch end")
    log_every_steps: Int = Field(10, ge=1)
    checkpoint_every_steps: Int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> TrainingSpec:
        if self.batch_size % self.grad_accumulation:
            raise Problems([("batch_size", f"batch_size {self.batch_size} is not divisible by "
                                            f"grad_accumulation {self.grad_accumulation}")])
        return self


class MlflowSpec(StrictModel):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///<output.dir>/mlflow.db")
    experiment: str = Field(DEFAULT_EXPERIMENT, min_length=1)
    run_name: str | None = None
    log_model: Bool = True


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
            config = source_config(teacher.source)
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
            resolve_terms(value)
        except ObjectiveConfigError as err:
            raise Problems([(err.key, err.message)]) from None
        return value

    @model_validator(mode="after")
    def _check_models(self) -> JobSpec:
        """The objective's layer maps against both depths and task.max_length against the models' positions
        (from the config.json of local and packaged models; a Hub model's is not fetched)."""
        teacher = model_limits(self.teacher.source)
        student = model_limits(self.student.pretrained) if self.student.pretrained else {}
        if self.student.from_teacher is not None:
            student = {**teacher, "layers": len(self.student.from_teacher.layers)}
        elif self.student.architecture is not None:
            student = {**teacher, "layers": self.student.architecture.num_layers}
        problems = []
        try:
            check_depths(self.objective, student.get("layers"), teacher.get("layers"))
        except ObjectiveConfigError as err:
            problems.append((f"objective.{err.key}", err.message))
        for who, limits in (("teacher", teacher), ("student", student)):
            positions = limits.get("positions")
            if positions is not None and self.task.max_length > positions:
                problems.append(("task.max_length", f"{self.task.max_length} exceeds the {who}'s {positions} "
                                                    f"positions (max_position_embeddings in its config.json)"))
                break
        raise_if(problems)
        return self

    @field_validator("deepspeed")
    @classmethod
    def _check_deepspeed(cls, value: DeepSpeedSpec, info: ValidationInfo) -> DeepSpeedSpec:
        training = info.data.get("training")
        if training is not None:
            ours = generated_config(value, batch_size=training.batch_size, grad_accumulation=training.grad_accumulation,
                                    grad_clip=training.grad_clip, world_size=None)
            conflicts = config_conflicts(value.config, ours)
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
        return resolve_terms(self.objective)

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
            source = {"local": files_fingerprint(p for p in Path(source).iterdir() if p.is_file())}
        info = self.task.task_info()
        ft = self.teacher.finetune
        payload = {
            "version": _TEACHER_CACHE_VERSION,
            "teacher": source,
            "finetune": None if ft is None else ft.model_dump(mode="json", exclude={"max_train_examples"}),
            "data": {**self.task.data_identity(), "max_train_examples": self.teacher_train_examples()},
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
        ours = generated_config(self.deepspeed, batch_size=t.batch_size, grad_accumulation=t.grad_accumulation,
                                grad_clip=t.grad_clip, world_size=world_size)
        conflicts = config_conflicts(self.deepspeed.config, ours)
        if conflicts:
            raise SpecError([SpecIssue(self._file, line_of(self._lines, f"deepspeed.config.{k}"),
                                       f"deepspeed.config.{k}", m) for k, m in conflicts])
        return merge_config(self.deepspeed.config, ours)

    def to_dict(self, *, redact: bool = False) -> dict[str, Any]:
        """The resolved spec as JSON-compatible data (absolute paths); `from_mapping` reads it back.
        `redact`: the tracking URI without credentials (`jobs.storage.redact_uri`), for what is stored or logged."""
        data = self.model_dump(mode="json")
        return redact_tracking_uris(data) if redact else data

    def flat_params(self) -> dict[str, str]:
        """The resolved spec flattened to dotted keys for MLflow params (unset options left out, lists and
        empty mappings as compact JSON), plus the expanded objective as `objective_terms.<term>.<option>` and
        `teacher.cache_key`. Keys are cut to 250 and values to 6000 characters
        (a hash suffix keeps cut keys distinct and marks cut values)."""
        flat: dict[str, str] = {}
        _flatten(self.to_dict(redact=True), "", flat)
        _flatten(self.resolved_objective(), "objective_terms", flat)
        flat["teacher.cache_key"] = self.teacher_cache_key()
        out = {}
        for key, value in flat.items():
            out[_truncate(key, MLFLOW_KEY_LIMIT)] = _truncate(value, MLFLOW_VALUE_LIMIT)
        return out


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



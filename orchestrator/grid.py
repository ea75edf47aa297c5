"""`GridSpec`: a sweep of distillation jobs, read from grid.yaml and validated before anything runs.

    job: {...a JobSpec mapping...}        # or the path of a job YAML file (relative to this file)
    sweep:
      space:                              # dotted JobSpec key -> one domain
        training.learning_rate: {loguniform: [1.0e-5, 1.0e-4]}
        objective: {grid: [{preset: ckd-paper}, {terms: {ce: {}, logit_kd: {temperature: 4}}}]}
        student: {grid: [{from_teacher: {layers: [0, 5]}}, {from_teacher: {layers: [0, 2, 5]}}]}
        training.seed: {choice: [1, 2]}
      samples: 1                          # Tune num_samples (see `search`)
      search: {algorithm: grid, seed: 0}  # grid | random | optuna
      scheduler: {kind: asha, grace_period: 1, reduction_factor: 2, max_t: null}
      metric: null                        # default: eval/<the task's primary metric>
      mode: null                          # default: the metric's mode (max for every GLUE metric)
      max_concurrent_trials: null         # default: as many as the cluster can place
      resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}
      max_failures: 2                     # retries of a failed trial, from its last checkpoint
      max_trials: 10000                   # more trials than this is refused (a typo guard): raise it to mean it
    cluster: {backend: local}             # local | ray | slurm | kubernetes, plus the backend's fields
    mlflow: {tracking_uri: null, experiment: null, registered_model: null, alias: champion}
    root: null                            # sweep root; default <grid dir>/sweeps/<grid file stem>

Domains: `grid: [v, ...]` (every value is tried), `choice: [v, ...]` (one sampled per trial),
`uniform: [lo, hi]`, `loguniform: [lo, hi]`, `randint: [lo, hi]` (integers, both ends included),
`quniform: [lo, hi, q]`, `qloguniform: [lo, hi, q]` (multiples of q; lo and hi must be multiples).
A value that is a mapping replaces the whole subtree at its key (that is how paired values, such as a
student architecture, are swept); a dotted key sets one leaf. Keys are applied shallowest first, so
`student` and `student.from_teacher.copy_classifier` compose.

Search: `grid` (default) tries every combination of the `grid:` values, each `samples` times, sampling
the other domains (Ray Tune's variant generator, seeded); `random` and `optuna` draw `samples` trials
from the sampled domains only (a `grid:` domain is an error there: use `choice:`, a categorical).
The scheduler counts evaluation rounds (Tune's training_iteration): one per `ray.train.report`.

Validation (`load_grid`, at `plan` and `submit`) collects every problem into one `SpecError` of
"file:line: dotted.key: message": the grid's own keys (strict; the `cluster:` block by its backend's config
model, `cluster.base.config_model`), the base job as a JobSpec (keys `job.<key>`), each space key against
the JobSpec schema and each domain, every grid point applied to the base job (grid and choice values, and
the distributions at their bounds and middle; keys `sweep.space.<key>`, with the offending value), the
metric against what the task reports, the resources against the job's batch and an explicit local
cluster, and the search/scheduler settings against the space (the cross-checks are in
orchestrator/grid_checks.py). A submitted sweep's grid is read back from sweep.json with
`GridSpec.from_record`, which trusts those checks and does not run them again.

This module is the grid document; the search space and its sections are in orchestrator/space.py, the
Ray Tune wiring in orchestrator/tune.py.
"""

from __future__ import annotations

import copy
import itertools
import math
import posixpath
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, ValidationInfo, field_serializer, field_validator

from cluster.base import BACKENDS, BackendUnavailable, ClusterSpec, config_model
from jobs.glue import METRIC_MODE
from jobs.spec import JobSpec
from jobs.specbase import Problems, SpecError, SpecIssue, StrictModel
from jobs.specbase import apply_overrides, parse_value, read_yaml_mapping, validation_issues
from jobs.storage import redact_tracking_uris, tracking_uri_or_default, unredact_uri
from orchestrator import grid_checks
from orchestrator.space import DOMAIN_KINDS, Sampled, SweepSpec, apply_trial, show_value

__all__ = ["GridSpec", "MlflowGridSpec", "default_mode", "load_grid", "registered_model_name"]


# ---------------------------------------------------------------------------------------------- mlflow


class MlflowGridSpec(StrictModel):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db")
    experiment: str | None = Field(None, min_length=1, max_length=500, description="default: the grid file's stem")
    registered_model: str | None = Field(None, description="default: the experiment name, sanitised")
    alias: str = "champion"

    @field_validator("registered_model")
    @classmethod
    def _check_model_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        norm = posixpath.normpath(value)
        if not value.strip() or "/" in value or ":" in value or norm != value or norm in (".", "..") \
                or norm.startswith(".."):
            raise ValueError(f"invalid registered model name {value!r}: not empty, no '/' or ':', not a path")
        return value

    @field_validator("alias")
    @classmethod
    def _check_alias(cls, value: str) -> str:
        if not re.fullmatch(r"[\w-]{1,255}", value):
            raise ValueError(f"invalid alias {value!r}: letters, digits, '_' and '-' only (at most 255)")
        if value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
            raise ValueError(f"alias {value!r} is reserved by MLflow (latest, v<number>)")
        return value


def registered_model_name(experiment: str) -> str:
    """An MLflow registered model name from an experiment name ('/', ':' and spaces become '-')."""
    name = re.sub(r"[^\w.-]+", "-", experiment).strip("-.")
    return name or "ckd-student"


# -------------------------------------------------------------------------------------------- the grid


class GridSpec(StrictModel):
    """A sweep: a base job, a search space over its keys, how to search and schedule, where to run and
    where results go. Build with `load_grid` (or `GridSpec.from_mapping`), which run every check; after
    loading, `job` is the resolved base job mapping (absolute paths) and every default is filled in, so
    `to_dict()` reads back with `from_mapping`, or, stored in a sweep's record, with `from_record`."""

    job: dict[str, Any]
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    cluster: ClusterSpec = Field(default_factory=lambda: config_model("local")(backend="local"),
                                 description="backend: local | ray | slurm | kubernetes, plus the backend's keys")
    mlflow: MlflowGridSpec = Field(default_factory=MlflowGridSpec)
    root: Path | None = Field(None, description="sweep root; default <grid dir>/sweeps/<grid stem>")

    _file: str = PrivateAttr("<grid>")
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)
    _overridden: dict[str, str] = PrivateAttr(default_factory=dict)
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _base_job: JobSpec | None = PrivateAttr(None)
    _rounds: int | None = PrivateAttr(None)

    @field_validator("cluster", mode="before")
    @classmethod
    def _check_cluster(cls, value: Any, info: ValidationInfo) -> Any:
        """The block validated by its backend's own config model (no `cluster:` block: local)."""
        if isinstance(value, ClusterSpec):
            return value
        if value is None:
            value = {}
        if isinstance(value, str):
            value = {"backend": value}  # shorthand: `cluster: local`
        if not isinstance(value, Mapping):
            raise Problems([("", f"expected a mapping with backend: {' | '.join(BACKENDS)}, "
                                 f"got {show_value(value)}")])
        fields = {"backend": "local", **value}
        try:
            model = config_model(str(fields["backend"]))
        except (ValueError, BackendUnavailable) as err:
            raise Problems([("backend", str(err))]) from None
        try:
            return model.model_validate(fields, context=info.context)
        except ValidationError as err:
            raise Problems([(i.key, i.message) for i in validation_issues(err, file="", root=model)]) from None

    @field_serializer("cluster")
    def _dump_cluster(self, value: ClusterSpec) -> dict[str, Any]:
        # The backend's own model, not ClusterSpec's single key: sweep.json keeps the whole block.
        return {"backend": self.backend, **value.model_dump(mode="json")}

    @field_validator("root", mode="before")
    @classmethod
    def _resolve_root(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, (str, Path)) and str(value):
            path = Path(str(value)).expanduser()
            base = Path((info.context or {}).get("base_dir") or Path.cwd())
            return path if path.is_absolute() else (base / path).resolve()
        return value

    # ---------------------------------------------------------------------------------- construction

    @classmethod
    def from_mapping(cls, data: Any, *, base_dir: str | Path | None = None, file: str | Path | None = None,
                     lines: Mapping[str, int] | None = None, overridden: Mapping[str, str] | None = None) -> GridSpec:
        """Validate a grid given as nested mappings (a YAML document, or a `to_dict()` read back).

        Args:
            data: the grid.
            base_dir: relative paths (the job file, root, paths in the job and in sweep values) are
                resolved against it; default the current directory.
            file: the grid file, named in errors; its stem is the default experiment and sweep root name.
            lines: dotted key -> 1-based line, for error messages.
            overridden: dotted key -> the override that set it, named in errors instead of a line.

        Raises:
            SpecError: every problem, one line each.
        """
        return cls._build(data, base_dir=base_dir, file=file, lines=lines, overridden=overridden)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> GridSpec:
        """The grid of a submitted sweep, read back from its record (sweep.json: `grid`, the resolved grid,
        and `grid_file`).

        The grid was fully checked when it was submitted (`load_grid`); this validates the document again
        (keys, types, the cluster block) but does not re-apply its points to the job: a record is trusted.

        Raises:
            SpecError: the record's grid does not fit this version's schema.
        """
        file = str(record["grid_file"])
        base = Path(file).parent
        try:
            grid = cls.model_validate(record["grid"], context={"base_dir": base})
        except ValidationError as err:
            raise SpecError(validation_issues(err, file=file, root=cls)) from None
        grid._file, grid._base_dir = file, base
        # sweep.json keeps the tracking URI without credentials: the real one comes back from the environment
        grid.mlflow.tracking_uri = unredact_uri(grid.mlflow.tracking_uri)
        return grid

    @classmethod
    def _build(cls, data: Any, *, base_dir: str | Path | None, file: str | Path | None,
               lines: Mapping[str, int] | None, overridden: Mapping[str, str] | None,
               job_overrides: Sequence[str] = ()) -> GridSpec:
        """The grid's own keys, then the cross-checks against the job (orchestrator/grid_checks.py); every
        problem raised at once; defaults filled in (root, experiment, metric and mode, ASHA's settings)."""
        file_name = str(file) if file is not None else "<grid>"
        stem = Path(file_name).stem if file is not None else "grid"
        base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
        lines, overridden = dict(lines or {}), dict(overridden or {})
        sink = grid_checks.IssueSink(file_name, lines, overridden)
        if not isinstance(data, Mapping):
            raise SpecError([SpecIssue(file_name, 1, "", f"expected a mapping of sections (job, sweep, cluster, "
                                                         f"mlflow, root), got {type(data).__name__}")])
        data = dict(data)

        raw_root = data.get("root")
        root = (Path(str(raw_root)).expanduser() if isinstance(raw_root, (str, Path)) and str(raw_root)
                else Path("sweeps") / stem)
        root = root if root.is_absolute() else (base / root).resolve()

        if root.exists() and not root.is_dir():
            sink.add("root", f"{str(root)!r} is a file: the sweep root must be a directory (or not exist yet)")
        base_job, base_mapping = grid_checks.load_base_job(data.get("job"), sink, base, root, job_overrides)
        data["job"] = base_mapping if base_mapping is not None else {}

        grid: GridSpec | None = None
        try:
            grid = cls.model_validate(data, context={"base_dir": base})
        except ValidationError as err:
            sink.issues += validation_issues(err, file=file_name, lines=lines, overridden=overridden, root=cls)

        space_raw = data.get("sweep", {}).get("space") if isinstance(data.get("sweep"), Mapping) else None
        bad_keys = grid_checks.check_space_keys(space_raw, sink) if isinstance(space_raw, Mapping) else set()

        if grid is not None and base_job is not None:
            grid._file, grid._lines, grid._overridden, grid._base_dir = file_name, lines, overridden, base
            grid._base_job = base_job
            grid._rounds = grid_checks.validate_points(grid, sink, bad_keys)
        elif base_job is not None and isinstance(space_raw, Mapping):
            # The grid has other problems: still check the values of every domain that parses, so that
            # one run reports them all.
            grid_checks.validate_parsed_points(sink, base_job, data, base, space_raw, bad_keys)
        if sink.issues:
            # In file order, like a compiler; issues set by overrides (no line) last.
            raise SpecError(sorted(sink.issues, key=lambda i: (i.file != file_name, i.file, i.line is None,
                                                                i.line or 0)))
        assert grid is not None and base_job is not None

        grid.root = grid.root or root
        grid.mlflow.experiment = grid.mlflow.experiment or stem
        grid.mlflow.registered_model = grid.mlflow.registered_model or registered_model_name(grid.mlflow.experiment)
        grid.sweep.metric = grid.sweep.metric or f"eval/{base_job.task.task_info().primary_metric}"
        grid.sweep.mode = grid.sweep.mode or typing.cast(Literal["max", "min"], default_mode(grid.sweep.metric))
        if grid.sweep.scheduler.kind == "asha":
            grid.sweep.scheduler.grace_period = grid.sweep.scheduler.grace_period or 1
            grid.sweep.scheduler.reduction_factor = grid.sweep.scheduler.reduction_factor or 2
        return grid

    # ------------------------------------------------------------------------------------------ access

    @property
    def base_job(self) -> JobSpec:
        """The validated base job (before any trial's values)."""
        if self._base_job is None:
            # A grid from a record: its job was checked at submit, and is built only when asked for.
            self._base_job = JobSpec.from_mapping(self.job, base_dir=self._base_dir, file=self._file)
        return self._base_job

    @property
    def file(self) -> str:
        return self._file

    @property
    def base_dir(self) -> Path:
        """The grid file's directory: relative paths in sweep values are resolved against it."""
        return self._base_dir

    @property
    def backend(self) -> str:
        """The backend's name (`cluster.backend`): local, ray, slurm or kubernetes."""
        return self.cluster.backend

    @property
    def metric_name(self) -> str:
        """The Tune / MLflow metric the sweep optimises, e.g. "eval/accuracy"."""
        assert self.sweep.metric is not None
        return self.sweep.metric

    @property
    def metric_mode(self) -> str:
        assert self.sweep.mode is not None
        return self.sweep.mode

    @property
    def sweep_root(self) -> Path:
        assert self.root is not None
        return self.root

    def tracking_uri(self, env: Mapping[str, str] | None = None) -> str:
        """mlflow.tracking_uri, else env["MLFLOW_TRACKING_URI"], else SQLite under the sweep root."""
        return tracking_uri_or_default(self.mlflow.tracking_uri, env, self.sweep_root / "mlflow.db")

    def to_dict(self) -> dict[str, Any]:
        """The resolved grid as JSON-compatible data (sweep.json's `grid`), every tracking URI without
        credentials (`jobs.storage.redact_uri`); `from_record` reads it back."""
        return redact_tracking_uris(self.model_dump(mode="json"))

    # ------------------------------------------------------------------------------------------ trials

    def job_mapping_for(self, trial_config: Mapping[str, Any]) -> dict[str, Any]:
        """The base job mapping with a trial's values applied (see `apply_trial`)."""
        return apply_trial(self.job, trial_config)

    def job_spec_for(self, trial_config: Mapping[str, Any]) -> JobSpec:
        """The validated JobSpec of one trial (a Tune config: dotted job key -> value).

        Raises:
            SpecError: the trial's values make an invalid job; issues keyed `sweep.space.<key>`.
        """
        try:
            return grid_checks.trial_spec(self.job, trial_config, self._base_dir, self._file)
        except SpecError as err:
            sink = grid_checks.IssueSink(self._file, self._lines, self._overridden)
            for issue in err.issues:
                for key in grid_checks.blame(issue.key, list(trial_config)):
                    sink.add(f"sweep.space.{key}", f"value {show_value(trial_config[key])} makes an invalid job: "
                                                   f"{issue.key or 'job'}: {issue.message}")
            raise SpecError(sink.issues) from None

    def total_trials(self) -> int:
        """Trials the sweep runs: grid combinations x samples (grid search), else samples (counted, not
        listed; at most sweep.max_trials)."""
        return self.sweep.total_trials()

    def trial_configs_for_plan(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The trials in Ray Tune's order: grid values concrete, sampled domains as `Sampled` (prints as
        "loguniform(1e-05, 0.0001)"). Tune varies the grid key first in sorted order fastest and repeats
        the whole grid per sample."""
        space = self.sweep.space
        grid_keys = sorted(k for k, d in space.items() if d.is_grid) if self.sweep.search.algorithm == "grid" else []
        out: list[dict[str, Any]] = []
        combos = itertools.product(*(space[k].values or [] for k in reversed(grid_keys)))
        combos_list = [dict(zip(reversed(grid_keys), c)) for c in combos]
        for _ in range(self.sweep.samples):
            for combo in combos_list:
                if limit is not None and len(out) >= limit:
                    return out
                out.append({k: copy.deepcopy(combo[k]) if k in combo else Sampled(d) for k, d in space.items()})
        return out

    def evaluation_rounds(self) -> int | None:
        """Evaluation rounds of the longest trial when knowable without the data (every trial evaluates once
        per epoch and has no max_steps), else None; known only after the grid checks (`load_grid`,
        `from_mapping`), None for a grid from a record."""
        return self._rounds

    def concurrent_trials(self, cpus: float, gpus: float = 0) -> int:
        """How many trials run at once on a cluster with these free CPUs and GPUs (0: none fits), capped by
        sweep.max_concurrent_trials and the number of trials."""
        resources = self.sweep.resources
        fit = math.floor(cpus / resources.cpus + 1e-9)
        if resources.gpus > 0:
            fit = min(fit, math.floor(gpus / resources.gpus + 1e-9))
        if self.sweep.max_concurrent_trials is not None:
            fit = min(fit, self.sweep.max_concurrent_trials)
        return max(0, min(fit, self.total_trials()))


# -------------------------------------------------------------------------------------------- loading


def load_grid(path: str | Path, overrides: Sequence[str] = ()) -> GridSpec:
    """Read, override and validate a grid file.

    Args:
        path: the grid YAML; relative paths in it are resolved against its directory.
        overrides: `dotted.key=value` strings applied before validation. `job.<key>=...` reaches into the
            job (also when `job:` names a job file); `sweep.space.<job key>.<kind>=[...]` or
            `sweep.space.<job key>={kind: [...]}` replaces one domain, and `sweep.space.<job key>=` removes it.

    Raises:
        SpecError: every problem, one line each ("file:line: dotted.key: message").
    """
    path = Path(path)
    file = str(path)
    data, lines = read_yaml_mapping(path, "grid")
    data, overridden, job_overrides = _apply_grid_overrides(data, overrides, file)
    return GridSpec._build(data, base_dir=path.resolve().parent, file=file, lines=lines, overridden=overridden,
                           job_overrides=job_overrides)


def _apply_grid_overrides(data: dict[str, Any], overrides: Iterable[str], file: str
                          ) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    job_is_file = isinstance(data.get("job"), (str, Path))
    plain, job_overrides, space_overrides = [], [], []
    for text in overrides:
        key = text.partition("=")[0].strip()
        if job_is_file and key.startswith("job."):
            job_overrides.append(text.strip()[len("job."):])
        elif key.startswith("sweep.space."):
            space_overrides.append(text)
        else:
            plain.append(text)
    data, overridden = apply_overrides(data, plain, file)
    issues: list[SpecIssue] = []
    for text in space_overrides:
        key, _, raw = text.partition("=")
        rest = key.strip()[len("sweep.space."):]
        parts = rest.split(".")
        if not rest or not all(parts):
            issues.append(SpecIssue(file, None, key.strip(), f"bad override {text!r}: expected "
                                                             f"sweep.space.<job key>.<kind>=[...]"))
            continue
        try:
            value = parse_value(raw)
        except yaml.YAMLError as err:
            issues.append(SpecIssue(file, None, key.strip(), f"override {text!r}: value is not valid YAML ({err})"))
            continue
        if len(parts) > 1 and parts[-1] in DOMAIN_KINDS:
            rest, value = ".".join(parts[:-1]), {parts[-1]: value}
        sweep = data.setdefault("sweep", {})
        if not isinstance(sweep, dict) or not isinstance(sweep.setdefault("space", {}), dict):
            issues.append(SpecIssue(file, None, "sweep.space", f"override {text!r}: sweep.space is not a mapping"))
            continue
        if value is None:
            sweep["space"].pop(rest, None)
        else:
            sweep["space"][rest] = value
        overridden[f"sweep.space.{rest}"] = text
    if issues:
        raise SpecError(issues)
    return data, overridden, job_overrides


def default_mode(metric: str) -> str:
    """"min" for eval/loss; "max" for every task metric (all GLUE metrics are higher-is-better)."""
    return "min" if metric == "eval/loss" else METRIC_MODE



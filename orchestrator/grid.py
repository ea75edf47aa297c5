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

Validation (`load_grid`) collects every problem into one `SpecError` of "file:line: dotted.key: message":
the grid's own keys (strict), the base job as a JobSpec (keys `job.<key>`), each space key against the
JobSpec schema and each domain, every grid point applied to the base job (grid and choice values, and
the distributions at their bounds and middle; keys `sweep.space.<key>`, with the offending value), the
metric against what the task reports, the resources against the job's batch and an explicit local
cluster, and the search/scheduler settings against the space.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import importlib.util
import itertools
import json
import math
import posixpath
import re
import typing
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, ValidationInfo
from pydantic import field_serializer, field_validator, model_serializer, model_validator

from jobs.glue import METRIC_MODE, TaskInfo
from jobs.spec import JobSpec
from jobs.specbase import Problems, SpecError, SpecIssue, StrictModel
from jobs.specbase import apply_overrides, line_of, read_yaml_mapping, validation_issues
from jobs.storage import tracking_uri_or_default

__all__ = [
    "BACKENDS", "DOMAIN_KINDS", "METRIC_KEYS", "TRIAL_DRIVER_CPUS", "BackendUnavailable", "Domain", "GridSpec",
    "LocalClusterSpec", "MlflowGridSpec", "RayClusterSpec", "ResourcesSpec", "Sampled", "SchedulerSpec",
    "SearchSpec", "SweepSpec", "apply_trial", "cluster_model", "default_mode", "load_grid", "registered_model_name",
    "task_eval_metrics", "trial_label",
]  # fmt: skip

DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "randint", "quniform", "qloguniform")
BACKENDS = ("local", "ray", "slurm", "kubernetes")
# Backends whose config model lives in their own package, imported on demand.
_BACKEND_MODELS = {
    "slurm": ("cluster.slurm.config", "SlurmClusterSpec"),
    "kubernetes": ("cluster.kubernetes.config", "KubernetesClusterSpec"),
}
# The CPU bundle of the Tune function that drives one trial's TorchTrainer (Ray rejects 0).
TRIAL_DRIVER_CPUS = 0.01
# ASHA's max_t when none is given: high enough never to stop a trial that is still improving; the rungs
# below the trials' real length are the same as with a tight bound.
ASHA_UNBOUNDED_MAX_T = 1_000_000
# Grid points checked in every combination up to this many; beyond it, each value alone.
_MAX_CHECKED_COMBINATIONS = 512
# Job keys the sweep sets for every trial itself.
_SWEEP_OWNED = {"output": "output.* is set by the sweep for each trial (directories and MLflow runs)"}


# ---------------------------------------------------------------------------------------------- domains


def _show(value: Any, limit: int = 120) -> str:
    """A value as the user wrote it (JSON-like), cut to `limit` characters."""
    if isinstance(value, (Mapping, list, tuple)):
        text = json.dumps(value, default=str)
    elif isinstance(value, float):
        text = f"{value:g}" if math.isfinite(value) else str(value)
    else:
        text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tune_reserved(value: Any) -> str | None:
    """A mapping inside a value that Ray Tune would not pass through as data (`grid_search`, `eval`)."""
    if isinstance(value, Mapping):
        if "grid_search" in value or (len(value) == 1 and "eval" in value):
            return f"a mapping with key {'grid_search' if 'grid_search' in value else 'eval'!r} is read by Ray " \
                   f"Tune as a search directive, not passed as a value"
        return next((m for v in value.values() if (m := _tune_reserved(v))), None)
    if isinstance(value, list):
        return next((m for v in value if (m := _tune_reserved(v))), None)
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _multiple_of(value: float, q: float) -> bool:
    return math.isclose(value / q, round(value / q), rel_tol=1e-9, abs_tol=1e-9)


class Domain(StrictModel):
    """One search domain, written `{kind: arguments}` (see the module docstring)."""

    kind: Literal["grid", "choice", "uniform", "loguniform", "randint", "quniform", "qloguniform"]
    values: list[Any] | None = None
    low: int | float | None = None
    high: int | float | None = None
    q: int | float | None = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, data: Any) -> Any:
        if isinstance(data, Domain):
            return data
        if not isinstance(data, Mapping) or len(data) != 1 or next(iter(data)) not in DOMAIN_KINDS:
            got = _show(data) if not isinstance(data, Mapping) else f"keys {list(data)}"
            raise Problems([("", f"expected one domain, {{kind: arguments}} with kind one of "
                                 f"{', '.join(DOMAIN_KINDS)} (e.g. {{grid: [1, 2]}}, "
                                 f"{{loguniform: [1.0e-5, 1.0e-4]}}); "
                                 f"got {got}")])
        kind, args = next(iter(data.items()))
        if kind in ("grid", "choice"):
            if not isinstance(args, list) or not args:
                raise Problems([("", f"{kind}: expected a non-empty list of values, got {_show(args)}")])
            seen: dict[str, int] = {}
            for i, value in enumerate(args):
                key = json.dumps(value, sort_keys=True, default=str)
                if key in seen:
                    raise Problems([("", f"{kind}: value {_show(value)} is listed twice "
                                     f"(items {seen[key]} and {i})")])
                seen[key] = i
                reserved = _tune_reserved(value)
                if reserved:
                    raise Problems([("", f"{kind}: value {_show(value)}: {reserved}")])
            return {"kind": kind, "values": list(args)}
        quantized = kind.startswith("q")
        shape = "[low, high, q]" if quantized else "[low, high]"
        if not isinstance(args, list) or len(args) != (3 if quantized else 2) or not all(_is_number(a) for a in args):
            raise Problems([("", f"{kind}: expected {shape} (finite numbers), got {_show(args)}")])
        low, high = args[0], args[1]
        q = args[2] if quantized else None
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise Problems([("", f"randint: expected integer bounds [low, high], got {_show(args)}")])
        if low >= high:
            fixed = f"; for one fixed value write {{grid: [{low:g}]}}" if low == high else ""
            raise Problems([("", f"{kind}: low ({low:g}) must be below high ({high:g}){fixed}")])
        if "log" in kind and low <= 0:
            raise Problems([("", f"{kind}: low ({low:g}) must be > 0 for a log scale")])
        if q is not None:
            if q <= 0:
                raise Problems([("", f"{kind}: q ({q:g}) must be > 0")])
            bad = [name for name, v in (("low", low), ("high", high)) if not _multiple_of(v, q)]
            if bad:
                raise Problems([("", f"{kind}: {' and '.join(bad)} must be multiples of q ({q:g}) "
                                     f"(Ray Tune rounds samples to multiples of q)")])
        return {"kind": kind, "low": low, "high": high, "q": q}

    @model_serializer(mode="plain")
    def _dump(self) -> dict[str, Any]:
        if self.values is not None:
            return {self.kind: self.values}
        return {self.kind: [self.low, self.high] + ([self.q] if self.q is not None else [])}

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    @property
    def size(self) -> int | None:
        """How many distinct values (grid and choice), else None."""
        return len(self.values) if self.values is not None else None

    def tune(self) -> Any:
        """The Ray Tune domain (`tune.grid_search(...)` is a plain dict)."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(copy.deepcopy(self.values))
        if self.kind == "choice":
            return tune.choice(copy.deepcopy(self.values))
        if self.kind == "randint":
            return tune.randint(int(self.low), int(self.high) + 1)  # Tune's upper bound is exclusive
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "quniform":
            return tune.quniform(self.low, self.high, self.q)
        return tune.qloguniform(self.low, self.high, self.q)

    def check_points(self) -> list[tuple[Any, str]]:
        """The values validation tries, each with the key suffix of where it is written: every grid and
        choice value; a distribution's bounds and one inner point (off the middle, so that it is not
        integral for integral bounds: it catches a float domain over an integer key)."""
        if self.values is not None:
            return [(v, f"{self.kind}[{i}]") for i, v in enumerate(self.values)]
        low, high = self.low, self.high
        assert low is not None and high is not None
        if self.kind == "randint":
            return [(low, "randint[0]"), (high, "randint[1]")]
        inner = 0.381966  # 1 - 1/golden ratio
        mid = (math.exp(math.log(low) + inner * (math.log(high) - math.log(low))) if "log" in self.kind
               else low + inner * (high - low))
        if self.q is not None:
            mid = round(mid / self.q) * self.q
            if mid in (low, high):
                return [(low, f"{self.kind}[0]"), (high, f"{self.kind}[1]")]
        return [(low, f"{self.kind}[0]"), (high, f"{self.kind}[1]"), (mid, self.kind)]

    def __str__(self) -> str:
        if self.values is not None:
            return f"{self.kind}({', '.join(_show(v, 40) for v in self.values)})"
        args = [self.low, self.high] + ([self.q] if self.q is not None else [])
        return f"{self.kind}({', '.join(f'{a:g}' for a in args)})"


@dataclasses.dataclass(frozen=True)
class Sampled:
    """Stands for a value drawn per trial (in `GridSpec.trial_configs_for_plan`); prints as its domain."""

    domain: Domain

    def __str__(self) -> str:
        return str(self.domain)

    __repr__ = __str__


# --------------------------------------------------------------------------------------------- sections


class SearchSpec(StrictModel):
    """How trials are chosen: `grid` (every grid combination x samples), `random`, or `optuna` (TPE)."""

    algorithm: Literal["grid", "random", "optuna"] = "grid"
    seed: int | None = Field(0, description="seeds sampling (None: unseeded)")


class SchedulerSpec(StrictModel):
    """When trials stop: `fifo` (never early) or `asha` (successive halving over evaluation rounds)."""

    kind: Literal["fifo", "asha"] = "fifo"
    grace_period: int | None = Field(None, ge=1, description="asha: rounds before a trial can be stopped (default 1)")
    reduction_factor: float | None = Field(None, gt=1, description="asha: keep 1/rf of trials per rung (default 2)")
    max_t: int | None = Field(None, ge=1, description="asha: rounds at which a trial is stopped (default: unbounded)")

    @model_validator(mode="after")
    def _check(self) -> SchedulerSpec:
        if self.kind == "fifo":
            given = [k for k in ("grace_period", "reduction_factor", "max_t") if getattr(self, k) is not None]
            if given:
                raise Problems([(k, "only for kind: asha") for k in given])
        elif self.max_t is not None and self.grace_period is not None and self.grace_period > self.max_t:
            raise Problems([("grace_period", f"grace_period ({self.grace_period}) exceeds max_t ({self.max_t})")])
        return self


class ResourcesSpec(StrictModel):
    """Resources of one trial: a TorchTrainer of `workers` processes (the job's data-parallel world)."""

    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)

    @property
    def cpus(self) -> float:
        """CPUs one trial holds, its driver function included."""
        return self.workers * self.cpus_per_worker + TRIAL_DRIVER_CPUS

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker


class SweepSpec(StrictModel):
    space: dict[str, Domain] = Field(default_factory=dict)
    samples: int = Field(1, ge=1, description="Tune num_samples")
    search: SearchSpec = Field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    metric: str | None = Field(None, description="default: eval/<the task's primary metric>")
    mode: Literal["max", "min"] | None = Field(None, description="default: min for eval/loss, else max")
    max_concurrent_trials: int | None = Field(None, ge=1)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_failures: int = Field(2, ge=-1, description="retries per trial from its last checkpoint; -1: unlimited")

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        problems: list[tuple[str, str]] = []
        algorithm = self.search.algorithm
        if algorithm != "grid":
            for key, domain in self.space.items():
                if domain.is_grid:
                    problems.append((f"space.{key}", f"search.algorithm {algorithm} samples every domain and "
                                                     f"cannot enumerate a grid: write choice: [...] (a categorical), "
                                                     f"or use search.algorithm: grid"))
        if algorithm == "optuna":
            if not self.space:
                problems.append(("search.algorithm", "optuna needs at least one domain in sweep.space to search"))
            for key, domain in self.space.items():
                if domain.kind == "qloguniform":
                    problems.append((f"space.{key}", "optuna drops the quantisation of qloguniform: use loguniform, "
                                                     "or search.algorithm: random"))
            if importlib.util.find_spec("optuna") is None:
                problems.append(("search.algorithm", "optuna is not installed: pip install 'optuna>=4'"))
        _raise(problems)
        return self

    @field_validator("metric")
    @classmethod
    def _check_metric_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("eval/") or value == "eval/"):
            raise ValueError(f"expected an evaluation metric eval/<name> (e.g. eval/accuracy), got {value!r}")
        return value


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


# ---------------------------------------------------------------------------------------------- cluster


class LocalClusterSpec(StrictModel):
    """Ray started in the submitting process; `num_cpus` / `num_gpus` cap what it uses (default: all)."""

    backend: Literal["local"] = "local"
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)


_ADDRESS = re.compile(r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})/?$")


# Variables a Ray token travels in: never a plain value in a grid (they would be logged with the job).
_RAY_TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


class RayClusterSpec(StrictModel):
    """An existing Ray cluster, reached through its Jobs API (the dashboard address).

    The sweep driver runs there as a Ray job; the project's packages travel in the job's runtime
    environment, the sweep's record in its environment variables (see cluster/ray/sweeps.py).
    """

    backend: Literal["ray"] = "ray"
    address: str = Field(description="http(s)://host:port of the Ray dashboard (Jobs API), e.g. http://head:8265")
    sweep_root: str | None = Field(None, description="absolute directory where the driver keeps the sweep on the "
                                                     "cluster (Tune state, trials); default: the grid's root, "
                                                     "which suits a file system shared with the cluster")
    env_vars: dict[str, str] = Field(default_factory=dict, description="extra environment for the driver and "
                                                                       "the trials (e.g. HF_HOME)")
    excludes: list[str] = Field(default_factory=list, description="more gitignore-style patterns left out of "
                                                                  "the uploaded project")

    @field_validator("sweep_root")
    @classmethod
    def _check_sweep_root(cls, value: str | None) -> str | None:
        if value is not None and not posixpath.isabs(value):
            raise ValueError(f"expected an absolute path on the cluster's machines, got {value!r}")
        return None if value is None else posixpath.normpath(value)

    @field_validator("env_vars")
    @classmethod
    def _check_env_vars(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
        if bad:
            raise ValueError(f"not an environment variable name: {', '.join(map(repr, bad))}")
        tokens = [k for k in value if k in _RAY_TOKEN_ENV]
        if tokens:
            raise ValueError(f"{tokens[0]} must not be written in a grid: the submitting machine's token is read "
                             "from its own environment or ~/.ray/auth_token, and the cluster has its own")
        return value

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        match = _ADDRESS.match(value.strip())
        if not match or not 1 <= int(match.group(3)) <= 65535:
            raise ValueError(f"expected http(s)://host:port of the Ray dashboard, e.g. http://head:8265; got {value!r}")
        return value.strip().rstrip("/")


class BackendUnavailable(ValueError):
    """The backend is known but its package is missing or fails to import."""


_LOADED_BACKENDS: dict[type, str] = {LocalClusterSpec: "local", RayClusterSpec: "ray"}


def cluster_model(backend: str) -> type[BaseModel]:
    """The pydantic model validating `cluster:` for a backend.

    local and ray are defined here; slurm and kubernetes come from `cluster.<backend>.config`
    (`SlurmClusterSpec`, `KubernetesClusterSpec`), imported on demand.

    Raises:
        ValueError: an unknown backend (the message lists the valid ones).
        BackendUnavailable: a known backend whose module is not part of this version or fails to import.
    """
    if backend == "local":
        return LocalClusterSpec
    if backend == "ray":
        return RayClusterSpec
    if backend not in _BACKEND_MODELS:
        hint = difflib.get_close_matches(str(backend), BACKENDS, n=1)
        raise ValueError(f"unknown backend {backend!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; expected one of {', '.join(BACKENDS)}")
    module_name, class_name = _BACKEND_MODELS[backend]
    try:
        found = importlib.util.find_spec(module_name) is not None
    except ImportError:
        found = False
    if not found:
        raise BackendUnavailable(f"backend {backend!r} is not available in this version "
                                 f"({module_name} is missing); available: {', '.join(_available_backends())}")
    try:
        model = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise BackendUnavailable(f"backend {backend!r} cannot be loaded: {err}") from None
    _LOADED_BACKENDS[model] = backend
    return model


def _available_backends() -> list[str]:
    out = ["local", "ray"]
    for name, (module_name, _) in _BACKEND_MODELS.items():
        try:
            if importlib.util.find_spec(module_name) is not None:
                out.append(name)
        except ImportError:
            pass
    return out


# -------------------------------------------------------------------------------------------- the grid


def _raise(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise Problems(problems)


class GridSpec(StrictModel):
    """A sweep: a base job, a search space over its keys, how to search and schedule, where to run and
    where results go. Build with `load_grid` (or `GridSpec.from_mapping`); after loading, `job` is the
    resolved base job mapping (absolute paths) and every default is filled in, so `to_dict()` reads back
    with `from_mapping`."""

    job: dict[str, Any]
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    cluster: Any = Field(default_factory=LocalClusterSpec, description="backend: local | ray | slurm | kubernetes")
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
        if isinstance(value, BaseModel):
            return value
        if value is None:
            value = {}
        if isinstance(value, str):
            value = {"backend": value}  # shorthand: `cluster: local`
        if not isinstance(value, Mapping):
            raise Problems([("", f"expected a mapping with backend: {' | '.join(BACKENDS)}, got {_show(value)}")])
        backend = value.get("backend", "local")
        try:
            model = cluster_model(backend)
        except ValueError as err:
            raise Problems([("backend", str(err))]) from None
        fields = dict(value)
        if "backend" not in model.model_fields:
            fields.pop("backend", None)
        try:
            return model.model_validate(fields, context=info.context)
        except ValidationError as err:
            raise Problems([(i.key, i.message) for i in validation_issues(err, file="", root=model)]) from None

    @field_serializer("cluster")
    def _dump_cluster(self, value: Any) -> Any:
        dumped = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        return {"backend": self.backend, **dumped} if isinstance(dumped, dict) else dumped

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
    def _build(cls, data: Any, *, base_dir: str | Path | None, file: str | Path | None,
               lines: Mapping[str, int] | None, overridden: Mapping[str, str] | None,
               job_overrides: Sequence[str] = ()) -> GridSpec:
        file_name = str(file) if file is not None else "<grid>"
        stem = Path(file_name).stem if file is not None else "grid"
        base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
        lines, overridden = dict(lines or {}), dict(overridden or {})
        check = _Checker(file_name, lines, overridden)
        if not isinstance(data, Mapping):
            raise SpecError([SpecIssue(file_name, 1, "", f"expected a mapping of sections (job, sweep, cluster, "
                                                         f"mlflow, root), got {type(data).__name__}")])
        data = dict(data)

        raw_root = data.get("root")
        root = (Path(str(raw_root)).expanduser() if isinstance(raw_root, (str, Path)) and str(raw_root)
                else Path("sweeps") / stem)
        root = root if root.is_absolute() else (base / root).resolve()

        base_job, base_mapping = _load_base_job(data.get("job"), check, base, root, job_overrides)
        data["job"] = base_mapping if base_mapping is not None else {}

        grid: GridSpec | None = None
        try:
            grid = cls.model_validate(data, context={"base_dir": base})
        except ValidationError as err:
            check.issues += validation_issues(err, file=file_name, lines=lines, overridden=overridden, root=cls)

        space_raw = data.get("sweep", {}).get("space") if isinstance(data.get("sweep"), Mapping) else None
        bad_keys = _check_space_keys(space_raw, check) if isinstance(space_raw, Mapping) else set()

        if grid is not None and base_job is not None:
            grid._file, grid._lines, grid._overridden, grid._base_dir = file_name, lines, overridden, base
            grid._base_job = base_job
            grid._validate_points(check, bad_keys)
        elif base_job is not None and isinstance(space_raw, Mapping):
            # The grid has other problems: still check the values of every domain that parses, so that
            # one run reports them all.
            space = {}
            for key, raw in space_raw.items():
                try:
                    space[str(key)] = Domain.model_validate(raw)
                except ValidationError:
                    pass
            specs = _check_points(check, base_job, data["job"], base, file_name,
                                  {k: d for k, d in space.items() if k not in bad_keys}, workers=None)
            metric = data["sweep"].get("metric")
            if isinstance(metric, str) and metric.startswith("eval/"):
                _check_metric(check, specs, metric, base_job)
        if check.issues:
            # In file order, like a compiler; issues set by overrides (no line) last.
            raise SpecError(sorted(check.issues, key=lambda i: (i.file != file_name, i.file, i.line is None,
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

    def _validate_points(self, check: _Checker, bad_keys: set[str]) -> None:
        """Cross-checks that need the base job: every grid point, the metric, resources, ASHA's grace."""
        sweep = self.sweep
        space = {k: d for k, d in sweep.space.items() if k not in bad_keys}
        specs = _check_points(check, self.base_job, self.job, self._base_dir, self._file, space,
                              workers=sweep.resources.workers)
        _check_metric(check, specs, sweep.metric, self.base_job)
        self._check_resources(check)
        self._rounds = _evaluation_rounds(specs)
        scheduler = sweep.scheduler
        if scheduler.kind == "asha" and self._rounds is not None and (scheduler.grace_period or 1) > self._rounds:
            check.add("sweep.scheduler.grace_period",
                      f"grace_period ({scheduler.grace_period or 1}) exceeds the {self._rounds} evaluation round(s) "
                      f"of a trial (one per epoch): ASHA would never stop a trial; lower it or use kind: fifo")

    def _check_resources(self, check: _Checker) -> None:
        resources, cluster = self.sweep.resources, self.cluster
        if not isinstance(cluster, LocalClusterSpec):
            return
        if cluster.num_cpus is not None and resources.cpus > cluster.num_cpus:
            check.add("sweep.resources", f"a trial needs {resources.workers} x {resources.cpus_per_worker:g} CPUs "
                                         f"(+{TRIAL_DRIVER_CPUS:g} for its driver) but cluster.num_cpus is "
                                         f"{cluster.num_cpus}; lower cpus_per_worker (fractions are allowed) or "
                                         f"raise cluster.num_cpus (Ray counts logical CPUs)")
        if cluster.num_gpus is not None and resources.gpus > cluster.num_gpus:
            check.add("sweep.resources", f"a trial needs {resources.workers} x {resources.gpus_per_worker:g} GPUs "
                                         f"but cluster.num_gpus is {cluster.num_gpus}")

    # ------------------------------------------------------------------------------------------ access

    @property
    def base_job(self) -> JobSpec:
        """The validated base job (before any trial's values)."""
        if self._base_job is None:
            raise RuntimeError("GridSpec was not built by load_grid / GridSpec.from_mapping")
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
        return _LOADED_BACKENDS.get(type(self.cluster)) or getattr(self.cluster, "backend", "local")

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
        """The resolved grid as JSON-compatible data; `from_mapping(..., base_dir=grid.base_dir)` reads it back."""
        return self.model_dump(mode="json")

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
            return self._spec_for(trial_config)
        except SpecError as err:
            check = _Checker(self._file, self._lines, self._overridden)
            for issue in err.issues:
                for key in _blame(issue.key, list(trial_config)):
                    check.add(f"sweep.space.{key}", f"value {_show(trial_config[key])} makes an invalid job: "
                                                    f"{issue.key or 'job'}: {issue.message}")
            raise SpecError(check.issues) from None

    def _spec_for(self, trial_config: Mapping[str, Any]) -> JobSpec:
        return _trial_spec(self.job, trial_config, self._base_dir, self._file)

    def total_trials(self) -> int:
        """Trials the sweep runs: grid combinations x samples (grid search), else samples."""
        if self.sweep.search.algorithm != "grid":
            return self.sweep.samples
        return math.prod(d.size or 1 for d in self.sweep.space.values() if d.is_grid) * self.sweep.samples

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

    def tune_param_space(self) -> dict[str, Any]:
        """Ray Tune's param_space: {dotted job key: tune.grid_search([...]) | tune.choice(...) | ...}."""
        return {key: domain.tune() for key, domain in self.sweep.space.items()}

    def search_algorithm(self) -> Any:
        """The Tune searcher: a seeded `BasicVariantGenerator` (grid, random; None when unseeded) or an
        `OptunaSearch` (TPE). Created without metric/mode: pass `TuneConfig(metric=grid.metric_name,
        mode=grid.metric_mode)`."""
        search = self.sweep.search
        if search.algorithm == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            # Mappings (paired values) are fine as categorical choices with Optuna's in-memory storage,
            # which Tune uses; Optuna warns only because a persistent storage could not hold them.
            warnings.filterwarnings("ignore", message="Choices for a categorical distribution should be",
                                    category=UserWarning)
            return OptunaSearch(seed=search.seed)
        if search.seed is None:
            return None
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=search.seed)

    def scheduler(self) -> Any:
        """The Tune scheduler: `FIFOScheduler`, or `ASHAScheduler` over training_iteration (evaluation
        rounds). Created without metric/mode (they come from the TuneConfig)."""
        spec = self.sweep.scheduler
        if spec.kind == "fifo":
            from ray.tune.schedulers import FIFOScheduler

            return FIFOScheduler()
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="training_iteration", max_t=spec.max_t or ASHA_UNBOUNDED_MAX_T,
                             grace_period=spec.grace_period or 1, reduction_factor=spec.reduction_factor or 2)

    def evaluation_rounds(self) -> int | None:
        """Evaluation rounds of the longest trial when knowable without the data (every trial evaluates once
        per epoch and has no max_steps), else None."""
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
        value = apply_overrides({}, [f"v={raw}"], file)[0]["v"]
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


class _Checker:
    """Collects issues located in the grid file (line, or the override that set the key)."""

    def __init__(self, file: str, lines: Mapping[str, int], overridden: Mapping[str, str]) -> None:
        self.file, self.lines, self.overridden = file, lines, overridden
        self.issues: list[SpecIssue] = []

    def add(self, key: str, message: str, line_key: str | None = None) -> None:
        origin = next((v for k, v in self.overridden.items() if key == k or key.startswith(k + ".")), None)
        if origin is not None:
            self.issues.append(SpecIssue(self.file, None, key, f"{message} (set by override {origin!r})"))
        else:
            self.issues.append(SpecIssue(self.file, line_of(self.lines, line_key or key), key, message))


def _load_base_job(raw: Any, check: _Checker, base: Path, root: Path, job_overrides: Sequence[str]
                   ) -> tuple[JobSpec | None, dict[str, Any] | None]:
    """Validate `job:` (a mapping, or the path of a job file) as a JobSpec; issues keyed `job.<key>`.

    Returns (spec, the base mapping trials are applied to) or (None, None). The mapping is the resolved
    spec (absolute paths, defaults) without the objective's task when the job left it to task.glue, so
    that sweeping task.glue also changes the preset's task.
    """
    if raw is None:
        check.add("job", "required key is missing: a job mapping or the path of a job YAML file")
        return None, None
    if isinstance(raw, (str, Path)):
        path = Path(str(raw)).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            check.add("job", f"job file {str(path)!r} not found")
            return None, None
        try:
            data, lines = read_yaml_mapping(path, "job spec")
            data, job_overridden = apply_overrides(data, job_overrides, str(path))
        except SpecError as err:
            check.issues += [i._replace(key=f"job.{i.key}" if i.key else "job") for i in err.issues]
            return None, None
        job_overridden = {k: f"job.{v}" for k, v in job_overridden.items()}
        file, job_dir = str(path), path.resolve().parent
    elif isinstance(raw, Mapping):
        data = dict(raw)
        lines = {k[4:]: v for k, v in check.lines.items() if k.startswith("job.")}
        job_overridden = {k[4:]: v for k, v in check.overridden.items() if k.startswith("job.")}
        file, job_dir = check.file, base
    else:
        check.add("job", f"expected a job mapping or the path of a job YAML file, got {_show(raw)}")
        return None, None
    output = data.get("output")
    if output is None or (isinstance(output, Mapping) and output.get("dir") is None):
        # The sweep sets each trial's output; the base job only needs a valid one.
        data["output"] = {**(output or {}), "dir": str(root / "trials")}
    try:
        spec = JobSpec.from_mapping(data, base_dir=job_dir, file=file, lines=lines, overridden=job_overridden)
    except SpecError as err:
        check.issues += [i._replace(key=f"job.{i.key}" if i.key else "job") for i in err.issues]
        return None, None
    mapping = spec.to_dict()
    raw_objective = data.get("objective")
    if isinstance(raw_objective, Mapping) and "task" not in raw_objective:
        mapping["objective"].pop("task", None)
    return spec, mapping


def _trial_spec(base: Mapping[str, Any], trial_config: Mapping[str, Any], base_dir: Path, file: str) -> JobSpec:
    """The JobSpec of base + a trial's values; SpecError keyed by job keys (no lines)."""
    try:
        mapping = apply_trial(base, trial_config)
    except ValueError as err:
        raise SpecError([SpecIssue(file, None, "", str(err))]) from None
    return JobSpec.from_mapping(mapping, base_dir=base_dir, file=file)


def _check_points(check: _Checker, base_job: JobSpec, base: Mapping[str, Any], base_dir: Path, file: str,
                  space: Mapping[str, Domain], workers: int | None) -> list[JobSpec]:
    """Apply every checked value of every domain to the base job alone, then every combination (up to
    _MAX_CHECKED_COMBINATIONS) of values that pass alone; with `workers`, also require each job's batch
    to split into that many processes. Failures become issues at `sweep.space.<key>`, on the line of
    the offending value. Returns the valid jobs (the base job first when it passes)."""
    specs: list[JobSpec] = []
    reported: set[tuple[str, str, str]] = set()
    checks = {k: d.check_points() for k, d in space.items()}

    def attempt(config: Mapping[str, Any]) -> tuple[JobSpec | None, list[SpecIssue]]:
        try:
            spec = _trial_spec(base, config, base_dir, file)
            if workers is not None:
                spec.deepspeed_config(workers)
        except SpecError as err:
            return None, err.issues
        return spec, []

    def validate(point: dict[str, int]) -> bool:
        """point: space key -> index into its check points."""
        config = {k: checks[k][i][0] for k, i in point.items()}
        spec, issues = attempt(config)
        if spec is not None:
            specs.append(spec)
            return True
        for issue in issues:
            for key in _blame(issue.key, list(config)):
                if (key, issue.key, issue.message) in reported:
                    continue
                reported.add((key, issue.key, issue.message))
                # The other values this problem needs (a minimal set, found by dropping one at a time).
                needed = [k for k in config if k != key]
                for other in list(needed):
                    trial = {k: config[k] for k in config if k == key or (k in needed and k != other)}
                    if any((i.key, i.message) == (issue.key, issue.message) for i in attempt(trial)[1]):
                        needed.remove(other)
                value, suffix = checks[key][point[key]]
                others = ", ".join(f"{k}={_show(config[k], 60)}" for k in needed)
                message = (f"value {_show(value)}" + (f" (with {others})" if others else "")
                           + f" makes an invalid job: {issue.key or 'job'}: {issue.message}")
                if workers is not None and "process(es)" in issue.message:
                    message += f" (sweep.resources.workers = {workers})"
                check.add(f"sweep.space.{key}", message, line_key=f"sweep.space.{key}.{suffix}")
        return False

    if workers is not None:  # the base job with the sweep's resources
        try:
            base_job.deepspeed_config(workers)
            specs.append(base_job)
        except SpecError as err:
            for issue in err.issues:
                check.add(f"job.{issue.key}", f"{issue.message} (sweep.resources.workers = {workers})",
                          line_key=f"job.{issue.key}")
    failed_alone: set[tuple[str, int]] = set()
    for key, points in checks.items():
        for index in range(len(points)):
            if not validate({key: index}):
                failed_alone.add((key, index))
    keys = list(checks)
    if len(keys) >= 2 and math.prod(len(p) for p in checks.values()) <= _MAX_CHECKED_COMBINATIONS:
        for indices in itertools.product(*(range(len(checks[k])) for k in keys)):
            if not any((k, i) in failed_alone for k, i in zip(keys, indices)):
                validate(dict(zip(keys, indices)))
    return specs


def _check_metric(check: _Checker, specs: Sequence[JobSpec], metric: str | None, base_job: JobSpec) -> None:
    """The metric (or the default, the base task's primary metric) must be reported by every swept task."""
    infos: dict[str, TaskInfo] = {}
    for spec in specs:
        info = spec.task.task_info()
        infos.setdefault(info.name, info)
    if not infos:
        return
    reported = {name: set(task_eval_metrics(info)) for name, info in infos.items()}
    common = set.intersection(*reported.values())
    if metric is None:
        default = f"eval/{base_job.task.task_info().primary_metric}"
        if default not in common:
            check.add("sweep.metric", f"the swept tasks ({', '.join(infos)}) have no common primary metric; "
                                      f"set sweep.metric to one of {', '.join(sorted(common)) or '(none)'}")
    elif metric not in common:
        missing = [n for n, names in reported.items() if metric not in names]
        check.add("sweep.metric", f"{metric!r} is not reported by task {', '.join(missing)}; expected one of "
                                  f"{', '.join(sorted(common)) or '(none in common)'}")


def _check_space_keys(space: Mapping[Any, Any], check: _Checker) -> set[str]:
    """Each space key must be a JobSpec key path; returns the bad ones."""
    bad = set()
    for key in space:
        problem = _job_key_problem(str(key))
        if problem:
            bad.add(str(key))
            check.add(f"sweep.space.{key}", problem)
    return bad


def _job_key_problem(key: str) -> str | None:
    parts = key.split(".")
    if not key or not all(parts):
        return f"expected a dotted job key such as training.learning_rate, got {key!r}"
    if parts[0] in _SWEEP_OWNED:
        return _SWEEP_OWNED[parts[0]]
    model: Any = JobSpec
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the job"
        if model is None:  # below a free-form mapping (objective, deepspeed.config, dataset.files)
            return None
        if model == "leaf":
            return f"not a job key: {where} is a value, not a section"
        fields = model.model_fields
        if part not in fields:
            hint = difflib.get_close_matches(part, list(fields), n=1)
            return (f"not a job key: {where} has no {part!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; valid keys there: {', '.join(fields)}")
        model = _field_kind(fields[part].annotation)
    return None


def _field_kind(annotation: Any) -> Any:
    """A nested model class, None for a free-form mapping, or "leaf"."""
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if annotation is dict or typing.get_origin(annotation) is dict:
        return None
    for arg in args:
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    if any(typing.get_origin(a) is dict for a in args):
        return None
    return "leaf"


def _blame(issue_key: str, space_keys: Sequence[str]) -> list[str]:
    """The space keys a job issue comes from: those at, above or below the issue's key; when none is (the
    problem lies between keys, e.g. a batch size and the accumulation), every key of the trial."""
    related = [k for k in space_keys
               if not issue_key or issue_key == k or issue_key.startswith((k + ".", k + "["))
               or k.startswith(issue_key + ".")]
    return related or list(space_keys)


def _evaluation_rounds(specs: Sequence[JobSpec]) -> int | None:
    rounds = []
    for spec in specs:
        t = spec.training
        if t.max_steps is not None or t.eval_every_steps is not None:
            return None
        rounds.append(t.epochs)
    return max(rounds) if rounds else None


# ------------------------------------------------------------------------------------------ metrics


# The keys `jobs.metrics.compute_metrics` returns per metric kind (its docstring's table). Copied rather
# than asked, because importing jobs.metrics (scikit-learn, scipy) costs `plan` seconds; a test keeps
# the two equal.
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "accuracy": ("accuracy",),
    "f1": ("f1", "accuracy"),
    "mcc": ("mcc",),
    "pearson_spearman": ("pearson", "spearman"),
}


def task_eval_metrics(info: TaskInfo) -> tuple[str, ...]:
    """The Tune/MLflow metrics a job of this task reports at each evaluation, named as
    `jobs.evaluation.metric_key` names them: `eval/<name>` per metric of its kind on the first dev split,
    `eval/<split>_<name>` on later ones (MNLI: eval/mismatched_accuracy), and `eval/loss`."""
    names = METRIC_KEYS[info.metric_kind]
    out = [f"eval/{n}" for n in names]
    for split in info.dev_splits[1:]:
        out += [f"eval/{split.removeprefix('validation_')}_{n}" for n in names]
    return (*out, "eval/loss")


def default_mode(metric: str) -> str:
    """"min" for eval/loss; "max" for every task metric (all GLUE metrics are higher-is-better)."""
    return "min" if metric == "eval/loss" else METRIC_MODE


# ------------------------------------------------------------------------------------------- trials


def apply_trial(base: Mapping[str, Any], trial_config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `base` (a job mapping) with a trial's values: each dotted key sets one leaf, creating
    missing sections; a mapping value replaces the whole subtree. Keys are applied shallowest first.

    Raises:
        ValueError: a key's path runs through a value that is not a mapping.
    """
    out = copy.deepcopy(dict(base))
    for key in sorted(trial_config, key=lambda k: k.count(".")):
        parts = key.split(".")
        node: dict[str, Any] = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ValueError(f"cannot set {key}: {where} is {_show(child)}, not a mapping")
            node = child
        node[parts[-1]] = copy.deepcopy(trial_config[key])
    return out


_LABEL_NAMES = {"learning_rate": "lr", "weight_decay": "wd", "batch_size": "bs", "grad_accumulation": "accum",
                "warmup_ratio": "warmup", "max_length": "maxlen", "from_teacher": "student"}


def trial_label(trial_config: Mapping[str, Any], max_value: int = 32) -> str:
    """A short human label for a trial, e.g. "lr=3e-05,preset=ckd-paper,student=L[0,5]".

    Each key is named by its last part (abbreviated: learning_rate -> lr), or by more parts where two keys
    would read the same; students read L[layers] / <layers>x<hidden> / the pretrained name, objectives
    their preset or their terms.
    """
    keys = list(trial_config)
    names = {k: _label_name(k, 1) for k in keys}
    for depth in range(2, 1 + max((k.count(".") + 1 for k in keys), default=1)):
        clashes = {n for n in names.values() if list(names.values()).count(n) > 1}
        if not clashes:
            break
        names.update({k: _label_name(k, depth) for k in keys if names[k] in clashes})
    return ",".join(f"{names[k]}={_label_value(k, trial_config[k], max_value)}" for k in keys)


def _label_name(key: str, depth: int) -> str:
    parts = key.split(".")
    return ".".join(parts[-depth:-1] + [_LABEL_NAMES.get(parts[-1], parts[-1])])


def trial_value_label(key: str, value: Any, limit: int = 64) -> str:
    """One swept value as a short readable text (the MLflow column of a sweep axis), e.g. "L[0,5]"."""
    return _label_value(key, value, limit)


def _label_value(key: str, value: Any, limit: int) -> str:
    last = key.rsplit(".", 1)[-1]
    text: str
    if isinstance(value, Mapping) and last in ("student", "from_teacher"):
        text = _student_label(value)
    elif isinstance(value, Mapping) and last == "objective":
        terms = value.get("terms") if isinstance(value.get("terms"), Mapping) else {}
        added = [n for n, o in terms.items() if not (isinstance(o, Mapping) and o.get("weight") == 0)]
        text = "+".join(([str(value["preset"])] if value.get("preset") else []) + added) or _compact(value)
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:.3g}"
    elif isinstance(value, str):
        text = value.rstrip("/").rsplit("/", 1)[-1] if "/" in value and not value.startswith("package:") else value
    else:
        text = _compact(value) if isinstance(value, (Mapping, list, tuple)) else str(value)
    return text if len(text) <= limit else text[: limit - 2] + ".."


def _student_label(value: Mapping[str, Any]) -> str:
    inner = value.get("from_teacher") if "from_teacher" in value else value
    if isinstance(inner, Mapping) and isinstance(inner.get("layers"), list):
        return "L" + _compact(inner["layers"])
    arch = value.get("architecture")
    if isinstance(arch, Mapping) and {"num_layers", "hidden_size"} <= set(arch):
        return f"{arch['num_layers']}x{arch['hidden_size']}"
    if isinstance(value.get("pretrained"), str):
        return value["pretrained"].rstrip("/").rsplit("/", 1)[-1]
    return _compact(value)


def _compact(value: Any) -> str:
    """JSON without quotes or spaces: {"a": [1, 2]} -> {a:[1,2]}."""
    return json.dumps(value, separators=(",", ":"), default=str).replace('"', "")

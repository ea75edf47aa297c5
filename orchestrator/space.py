"""The search space of a sweep: what one trial is, and the `sweep:` section that says how trials are drawn.

- `Domain`: one search domain, written `{kind: arguments}` (grid, choice, uniform, loguniform, randint,
  quniform, qloguniform; the grammar is in orchestrator/grid.py's docstring), with the values the grid
  checks try (`check_points`);
- `SearchSpec`, `SchedulerSpec`, `ResourcesSpec`, `SweepSpec`: the strict `sweep:` section;
- `apply_trial`: a trial's values (dotted job key -> value) applied to the base job mapping;
- `trial_label` / `trial_value_label`: short readable names of a trial and of one swept value (MLflow).

It imports neither Ray nor the job schema: Ray Tune's domains are made from these in orchestrator/tune.py,
and the values are checked against the job in orchestrator/grid_checks.py.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from jobs.specbase import Float, Int, Problems, StrictModel, raise_if, set_dotted

__all__ = [
    "DEFAULT_MAX_TRIALS", "MAX_CHECKED_VALUES", "DOMAIN_KINDS", "TRIAL_DRIVER_CPUS", "Domain", "ResourcesSpec", "Sampled", "SchedulerSpec", "SearchSpec",
    "SweepSpec", "apply_trial", "show_value", "trial_label", "trial_value_label",
]  # fmt: skip

DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "randint", "quniform", "qloguniform")
# A grid or choice longer than this is validated on a sample that covers its types (`Domain.check_points`).
MAX_CHECKED_VALUES = 64
# A sweep of more trials than this (grid combinations x samples) is refused unless sweep.max_trials says more.
DEFAULT_MAX_TRIALS = 10_000
# The CPU bundle of the Tune function that drives one trial's TorchTrainer (Ray rejects 0).
TRIAL_DRIVER_CPUS = 0.01


# ---------------------------------------------------------------------------------------------- domains


def show_value(value: Any, limit: int = 120) -> str:
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
            got = show_value(data) if not isinstance(data, Mapping) else f"keys {list(data)}"
            raise Problems([("", f"expected one domain, {{kind: arguments}} with kind one of "
                                 f"{', '.join(DOMAIN_KINDS)} (e.g. {{grid: [1, 2]}}, "
                                 f"{{loguniform: [1.0e-5, 1.0e-4]}}); "
                                 f"got {got}")])
        kind, args = next(iter(data.items()))
        if kind in ("grid", "choice"):
            if not isinstance(args, list) or not args:
                raise Problems([("", f"{kind}: expected a non-empty list of values, got {show_value(args)}")])
            seen: dict[Any, int] = {}
            for i, value in enumerate(args):
                scalar = type(value) in _SCALARS  # the common case, kept fast for a long list of seeds
                key = (type(value), value) if scalar else json.dumps(value, sort_keys=True, default=str)
                if key in seen:
                    raise Problems([("", f"{kind}: value {show_value(value)} is listed twice "
                                     f"(items {seen[key]} and {i})")])
                seen[key] = i
                reserved = None if scalar else _tune_reserved(value)
                if reserved:
                    raise Problems([("", f"{kind}: value {show_value(value)}: {reserved}")])
            return {"kind": kind, "values": list(args)}
        quantized = kind.startswith("q")
        shape = "[low, high, q]" if quantized else "[low, high]"
        if not isinstance(args, list) or len(args) != (3 if quantized else 2) or not all(_is_number(a) for a in args):
            raise Problems([("", f"{kind}: expected {shape} (finite numbers), got {show_value(args)}")])
        low, high = args[0], args[1]
        q = args[2] if quantized else None
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise Problems([("", f"randint: expected integer bounds [low, high], got {show_value(args)}")])
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

    def check_points(self) -> list[tuple[Any, str]]:
        """The values validation tries, each with the key suffix of where it is written: every grid and
        choice value (of a list longer than MAX_CHECKED_VALUES, a bounded sample that covers every type
        and shape of value and the extremes of the numbers: `_checked_indices`); a distribution's bounds
        and one inner point (off the middle, so that it is not integral for integral bounds: it catches a
        float domain over an integer key)."""
        if self.values is not None:
            return [(self.values[i], f"{self.kind}[{i}]") for i in _checked_indices(self.values)]
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
            return f"{self.kind}({', '.join(show_value(v, 40) for v in self.values)})"
        args = [self.low, self.high] + ([self.q] if self.q is not None else [])
        return f"{self.kind}({', '.join(f'{a:g}' for a in args)})"


_SCALARS = (int, float, str, bool, type(None))


def _shape(value: Any) -> Any:
    """A value's type and structure (a mapping's keys and their shapes), not its contents."""
    if type(value) in _SCALARS:
        return type(value).__name__
    if isinstance(value, Mapping):
        return ("map", tuple(sorted((str(k), _shape(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("list", tuple(sorted({repr(_shape(v)) for v in value})))
    return type(value).__name__


def _checked_indices(values: list[Any]) -> list[int]:
    """Which values of a grid or choice are validated: all of a short list; of a long one (a choice of
    300,000 seeds) the first and last few, the first of every shape, and each type's smallest and largest
    number, at most MAX_CHECKED_VALUES, so `plan` answers at once (a job's number bounds are ranges)."""
    if len(values) <= MAX_CHECKED_VALUES:
        return list(range(len(values)))
    first_of: dict[Any, int] = {}
    extremes: dict[str, list[int]] = {}
    for i, value in enumerate(values):
        first_of.setdefault(repr(_shape(value)), i)
        if type(value) in (int, float):
            if not math.isfinite(value):
                first_of.setdefault("non-finite", i)
                continue
            low_high = extremes.setdefault(type(value).__name__, [i, i])
            if value < values[low_high[0]]:
                low_high[0] = i
            if value > values[low_high[1]]:
                low_high[1] = i
    # Shapes and extremes first (what can be wrong), then the first and last few, in file order.
    chosen = dict.fromkeys([*first_of.values(), *(i for pair in extremes.values() for i in pair),
                            *range(8), *range(len(values) - 8, len(values))])
    return sorted(list(chosen)[:MAX_CHECKED_VALUES])


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
    seed: Int | None = Field(0, description="seeds sampling (None: unseeded)")


class SchedulerSpec(StrictModel):
    """When trials stop: `fifo` (never early) or `asha` (successive halving over evaluation rounds)."""

    kind: Literal["fifo", "asha"] = "fifo"
    grace_period: Int | None = Field(None, ge=1, description="asha: rounds before a trial can be stopped (default 1)")
    reduction_factor: Float | None = Field(None, gt=1, description="asha: keep 1/rf of trials per rung (default 2)")
    max_t: Int | None = Field(None, ge=1, description="asha: rounds at which a trial is stopped (default: unbounded)")

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

    workers: Int = Field(1, ge=1)
    cpus_per_worker: Float = Field(1, gt=0)
    gpus_per_worker: Float = Field(0, ge=0)

    @property
    def cpus(self) -> float:
        """CPUs one trial holds, its driver function included."""
        return self.workers * self.cpus_per_worker + TRIAL_DRIVER_CPUS

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker


class SweepSpec(StrictModel):
    """The `sweep:` section: the space, how trials are drawn and scheduled, what one trial holds."""

    space: dict[str, Domain] = Field(default_factory=dict)
    samples: Int = Field(1, ge=1, description="Tune num_samples")
    search: SearchSpec = Field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    metric: str | None = Field(None, description="default: eval/<the task's primary metric>")
    mode: Literal["max", "min"] | None = Field(None, description="default: min for eval/loss, else max")
    max_concurrent_trials: Int | None = Field(None, ge=1)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_failures: Int = Field(2, ge=-1, description="retries per trial from its last checkpoint; -1: unlimited")
    max_trials: Int = Field(DEFAULT_MAX_TRIALS, ge=1, description="refuse a sweep of more trials (a typo guard)")

    def total_trials(self) -> int:
        """Trials the sweep runs, counted without listing them: grid combinations x samples (grid search),
        else samples."""
        if self.search.algorithm != "grid":
            return self.samples
        return math.prod(d.size or 1 for d in self.space.values() if d.is_grid) * self.samples

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
        total = self.total_trials()
        if total > self.max_trials:
            grids = [f"{len(d.values or [])} ({k})" for k, d in self.space.items() if d.is_grid and algorithm == "grid"]
            count = " x ".join([*grids, f"{self.samples} samples"]) if grids else f"{self.samples} samples"
            problems.append(("samples" if self.samples > self.max_trials or not grids else "space",
                             f"the sweep has {total:,} trials ({count}), more than sweep.max_trials "
                             f"({self.max_trials:,}); set sweep.max_trials: {total} if you mean it"))
        raise_if(problems)
        return self

    @field_validator("metric")
    @classmethod
    def _check_metric_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("eval/") or value == "eval/"):
            raise ValueError(f"expected an evaluation metric eval/<name> (e.g. eval/accuracy), got {value!r}")
        return value

# ------------------------------------------------------------------------------------------- trials


def apply_trial(base: Mapping[str, Any], trial_config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `base` (a job mapping) with a trial's values: each dotted key sets one leaf, creating
    missing sections; a mapping value replaces the whole subtree. Keys are applied shallowest first, so
    that `student` and `student.from_teacher.copy_classifier` compose.

    Raises:
        ValueError: a key's path runs through a value that is not a mapping.
    """
    out = copy.deepcopy(dict(base))
    for key in sorted(trial_config, key=lambda k: k.count(".")):
        problem = set_dotted(out, key, copy.deepcopy(trial_config[key]))
        if problem:
            raise ValueError(f"cannot set {key}: {problem}")
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

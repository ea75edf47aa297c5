"""The grid's cross-checks against the job schema: every point of the search space is applied to the base
job and validated as a `JobSpec` before anything runs.

`GridSpec` (orchestrator/grid.py) validates its own keys; what needs the job is here:
- the base job (`load_base_job`: `job:` inline or a job file, issues keyed `job.<key>`);
- each space key against the JobSpec schema (`check_space_keys`);
- every grid and choice value and each distribution's bounds and inner point, alone and in combination
  (`check_points`: issues at `sweep.space.<key>` on the offending value's line, blaming the smallest set
  of keys that makes the job invalid);
- the metric against what every swept task reports (`check_metric`), the trial's resources against an
  explicit local cluster, ASHA's grace period against the trials' evaluation rounds.

Problems are collected in an `IssueSink` and raised by the caller all at once. These checks run once per
grid, at `load_grid` (plan, submit); a sweep's driver and trials trust the grid stored in sweep.json.
"""

from __future__ import annotations

import difflib
import itertools
import math
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from jobs.glue import TaskInfo
from jobs.spec import JobSpec
from jobs.specbase import SpecError, SpecIssue, apply_overrides, line_of, read_yaml_mapping
from orchestrator.space import TRIAL_DRIVER_CPUS, Domain, apply_trial, show_value

if TYPE_CHECKING:
    from orchestrator.grid import GridSpec

__all__ = [
    "IssueSink", "blame", "check_metric", "check_points", "check_space_keys", "evaluation_rounds", "load_base_job",
    "trial_spec", "validate_parsed_points", "validate_points",
]  # fmt: skip

# Grid points checked in every combination up to this many; beyond it, each value alone.
MAX_CHECKED_COMBINATIONS = 512
# Job keys the sweep sets for every trial itself.
_SWEEP_OWNED = {"output": "output.* is set by the sweep for each trial (directories and MLflow runs)"}


class IssueSink:
    """Collects the issues of one grid, each located in the grid file: on its line, or naming the override
    that set the key. Checks add to it; the caller raises them all at once as one `SpecError`."""

    def __init__(self, file: str, lines: Mapping[str, int], overridden: Mapping[str, str]) -> None:
        self.file, self.lines, self.overridden = file, lines, overridden
        self.issues: list[SpecIssue] = []

    def add(self, key: str, message: str, line_key: str | None = None) -> None:
        """Add a problem at dotted `key`, on the line of `line_key` (default: the key's own line)."""
        origin = next((v for k, v in self.overridden.items() if key == k or key.startswith(k + ".")), None)
        if origin is not None:
            self.issues.append(SpecIssue(self.file, None, key, f"{message} (set by override {origin!r})"))
        else:
            self.issues.append(SpecIssue(self.file, line_of(self.lines, line_key or key), key, message))


def validate_points(grid: GridSpec, sink: IssueSink, bad_keys: set[str]) -> int | None:
    """Cross-checks of a grid whose own keys are valid: every grid point, the metric, resources, ASHA's grace.

    Args:
        grid: the validated grid (its base job built).
        sink: where problems go.
        bad_keys: space keys already reported as not job keys (their values are not tried).

    Returns:
        The evaluation rounds of the longest trial when knowable without the data (see `evaluation_rounds`).
    """
    sweep = grid.sweep
    space = {k: d for k, d in sweep.space.items() if k not in bad_keys}
    specs = check_points(sink, grid.base_job, grid.job, grid.base_dir, grid.file, space,
                         workers=sweep.resources.workers)
    check_metric(sink, specs, sweep.metric, grid.base_job)
    _check_resources(grid, sink)
    rounds = evaluation_rounds(specs)
    scheduler = sweep.scheduler
    if scheduler.kind == "asha" and rounds is not None and (scheduler.grace_period or 1) > rounds:
        sink.add("sweep.scheduler.grace_period",
                 f"grace_period ({scheduler.grace_period or 1}) exceeds the {rounds} evaluation round(s) "
                 f"of a trial (one per epoch): ASHA would never stop a trial; lower it or use kind: fifo")
    return rounds


def validate_parsed_points(sink: IssueSink, base_job: JobSpec, data: Mapping[str, Any], base_dir: Path,
                           space_raw: Mapping[Any, Any], bad_keys: set[str]) -> None:
    """The values of every domain that parses, for a grid that has other problems, so that one run
    reports them all (`data`: the grid's mapping, its `job` the resolved base job)."""
    space = {}
    for key, raw in space_raw.items():
        try:
            space[str(key)] = Domain.model_validate(raw)
        except ValidationError:  # reported by the grid's own validation
            pass
    specs = check_points(sink, base_job, data["job"], base_dir, sink.file,
                         {k: d for k, d in space.items() if k not in bad_keys}, workers=None)
    metric = data["sweep"].get("metric")
    if isinstance(metric, str) and metric.startswith("eval/"):
        check_metric(sink, specs, metric, base_job)


def _check_resources(grid: GridSpec, sink: IssueSink) -> None:
    """A trial must fit an explicit local cluster (`cluster.num_cpus` / `num_gpus`)."""
    resources, cluster = grid.sweep.resources, grid.cluster
    if grid.backend != "local":  # elsewhere the backend's plan_problems check the fit
        return
    if cluster.num_cpus is not None and resources.cpus > cluster.num_cpus:
        sink.add("sweep.resources", f"a trial needs {resources.workers} x {resources.cpus_per_worker:g} CPUs "
                                    f"(+{TRIAL_DRIVER_CPUS:g} for its driver) but cluster.num_cpus is "
                                    f"{cluster.num_cpus}; lower cpus_per_worker (fractions are allowed) or "
                                    f"raise cluster.num_cpus (Ray counts logical CPUs)")
    if cluster.num_gpus is not None and resources.gpus > cluster.num_gpus:
        sink.add("sweep.resources", f"a trial needs {resources.workers} x {resources.gpus_per_worker:g} GPUs "
                                    f"but cluster.num_gpus is {cluster.num_gpus}")


def load_base_job(raw: Any, sink: IssueSink, base: Path, root: Path, job_overrides: Sequence[str]
                  ) -> tuple[JobSpec | None, dict[str, Any] | None]:
    """Validate `job:` (a mapping, or the path of a job file) as a JobSpec; issues keyed `job.<key>`.

    Returns (spec, the base mapping trials are applied to) or (None, None). The mapping is the resolved
    spec (absolute paths, defaults) without the objective's task when the job left it to task.glue, so
    that sweeping task.glue also changes the preset's task.
    """
    if raw is None:
        sink.add("job", "required key is missing: a job mapping or the path of a job YAML file")
        return None, None
    if isinstance(raw, (str, Path)):
        path = Path(str(raw)).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            sink.add("job", f"job file {str(path)!r} not found")
            return None, None
        try:
            data, lines = read_yaml_mapping(path, "job spec")
            data, job_overridden = apply_overrides(data, job_overrides, str(path))
        except SpecError as err:
            sink.issues += [i._replace(key=f"job.{i.key}" if i.key else "job") for i in err.issues]
            return None, None
        job_overridden = {k: f"job.{v}" for k, v in job_overridden.items()}
        file, job_dir = str(path), path.resolve().parent
    elif isinstance(raw, Mapping):
        data = dict(raw)
        lines = {k[4:]: v for k, v in sink.lines.items() if k.startswith("job.")}
        job_overridden = {k[4:]: v for k, v in sink.overridden.items() if k.startswith("job.")}
        file, job_dir = sink.file, base
    else:
        sink.add("job", f"expected a job mapping or the path of a job YAML file, got {show_value(raw)}")
        return None, None
    output = data.get("output")
    if output is None or (isinstance(output, Mapping) and output.get("dir") is None):
        # The sweep sets each trial's output; the base job only needs a valid one.
        data["output"] = {**(output or {}), "dir": str(root / "trials")}
    try:
        spec = JobSpec.from_mapping(data, base_dir=job_dir, file=file, lines=lines, overridden=job_overridden)
    except SpecError as err:
        sink.issues += [i._replace(key=f"job.{i.key}" if i.key else "job") for i in err.issues]
        return None, None
    mapping = spec.to_dict()
    raw_objective = data.get("objective")
    if isinstance(raw_objective, Mapping) and "task" not in raw_objective:
        mapping["objective"].pop("task", None)
    return spec, mapping


def trial_spec(base: Mapping[str, Any], trial_config: Mapping[str, Any], base_dir: Path, file: str) -> JobSpec:
    """The JobSpec of base + a trial's values; SpecError keyed by job keys (no lines)."""
    try:
        mapping = apply_trial(base, trial_config)
    except ValueError as err:
        raise SpecError([SpecIssue(file, None, "", str(err))]) from None
    return JobSpec.from_mapping(mapping, base_dir=base_dir, file=file)


def check_points(sink: IssueSink, base_job: JobSpec, base: Mapping[str, Any], base_dir: Path, file: str,
                 space: Mapping[str, Domain], workers: int | None) -> list[JobSpec]:
    """Apply every checked value of every domain to the base job alone, then every combination (up to
    MAX_CHECKED_COMBINATIONS) of values that pass alone; with `workers`, also require each job's batch
    to split into that many processes. Failures become issues at `sweep.space.<key>`, on the line of
    the offending value. Returns the valid jobs (the base job first when it passes)."""
    specs: list[JobSpec] = []
    reported: set[tuple[str, str, str]] = set()
    checks = {k: d.check_points() for k, d in space.items()}

    def attempt(config: Mapping[str, Any]) -> tuple[JobSpec | None, list[SpecIssue]]:
        try:
            spec = trial_spec(base, config, base_dir, file)
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
            for key in blame(issue.key, list(config)):
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
                others = ", ".join(f"{k}={show_value(config[k], 60)}" for k in needed)
                message = (f"value {show_value(value)}" + (f" (with {others})" if others else "")
                           + f" makes an invalid job: {issue.key or 'job'}: {issue.message}")
                if workers is not None and "process(es)" in issue.message:
                    message += f" (sweep.resources.workers = {workers})"
                sink.add(f"sweep.space.{key}", message, line_key=f"sweep.space.{key}.{suffix}")
        return False

    if workers is not None:  # the base job with the sweep's resources
        try:
            base_job.deepspeed_config(workers)
            specs.append(base_job)
        except SpecError as err:
            for issue in err.issues:
                sink.add(f"job.{issue.key}", f"{issue.message} (sweep.resources.workers = {workers})",
                          line_key=f"job.{issue.key}")
    failed_alone: set[tuple[str, int]] = set()
    for key, points in checks.items():
        for index in range(len(points)):
            if not validate({key: index}):
                failed_alone.add((key, index))
    keys = list(checks)
    if len(keys) >= 2 and math.prod(len(p) for p in checks.values()) <= MAX_CHECKED_COMBINATIONS:
        for indices in itertools.product(*(range(len(checks[k])) for k in keys)):
            if not any((k, i) in failed_alone for k, i in zip(keys, indices)):
                validate(dict(zip(keys, indices)))
    return specs


def check_metric(sink: IssueSink, specs: Sequence[JobSpec], metric: str | None, base_job: JobSpec) -> None:
    """The metric (or the default, the base task's primary metric) must be reported by every swept task."""
    infos: dict[str, TaskInfo] = {}
    for spec in specs:
        info = spec.task.task_info()
        infos.setdefault(info.name, info)
    if not infos:
        return
    reported = {name: set(info.eval_metric_names()) for name, info in infos.items()}
    common = set.intersection(*reported.values())
    if metric is None:
        default = f"eval/{base_job.task.task_info().primary_metric}"
        if default not in common:
            sink.add("sweep.metric", f"the swept tasks ({', '.join(infos)}) have no common primary metric; "
                                      f"set sweep.metric to one of {', '.join(sorted(common)) or '(none)'}")
    elif metric not in common:
        missing = [n for n, names in reported.items() if metric not in names]
        sink.add("sweep.metric", f"{metric!r} is not reported by task {', '.join(missing)}; expected one of "
                                  f"{', '.join(sorted(common)) or '(none in common)'}")


def check_space_keys(space: Mapping[Any, Any], sink: IssueSink) -> set[str]:
    """Each space key must be a JobSpec key path; returns the bad ones."""
    bad = set()
    for key in space:
        problem = _job_key_problem(str(key))
        if problem:
            bad.add(str(key))
            sink.add(f"sweep.space.{key}", problem)
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


def blame(issue_key: str, space_keys: Sequence[str]) -> list[str]:
    """The space keys a job issue comes from: those at, above or below the issue's key; when none is (the
    problem lies between keys, e.g. a batch size and the accumulation), every key of the trial."""
    related = [k for k in space_keys
               if not issue_key or issue_key == k or issue_key.startswith((k + ".", k + "["))
               or k.startswith(issue_key + ".")]
    return related or list(space_keys)


def evaluation_rounds(specs: Sequence[JobSpec]) -> int | None:
    """Evaluation rounds of the longest of these jobs when every one evaluates once per epoch (no max_steps,
    no eval_every_steps), else None: the rounds then depend on the data."""
    rounds = []
    for spec in specs:
        t = spec.training
        if t.max_steps is not None or t.eval_every_steps is not None:
            return None
        rounds.append(t.epochs)
    return max(rounds) if rounds else None

"""`SlurmClusterSpec`: the grid's `cluster:` block for `backend: slurm`, checked before anything is submitted.

    cluster:
      backend: slurm
      partition: gpu                  # sbatch --partition (a comma list is allowed)
      account: my-lab                 # --account
      qos: normal                     # --qos
      time: "1-00:00:00"              # --time: required; the walltime of one allocation (see below)
      nodes: 2                        # --nodes: one Ray node per Slurm node (head on the first)
      cpus_per_task: 16               # --cpus-per-task: Ray's CPUs on each node (one task per node)
      gpus_per_node: 4                # --gpus-per-node: Ray's GPUs on each node
      mem: 64G                        # --mem (per node): <integer>[K|M|G|T], MB without a unit, 0 = all
      constraint: a100                # --constraint
      exclude: "node[01-03]"          # --exclude
      setup:                          # shell lines run in the batch script before Python starts
        - module load cuda/12.4
        - source ~/venvs/ckd/bin/activate
      sbatch_extra: {mail-type: END, mail-user: me@example.org}   # any other sbatch option
      signal_delay_s: 120             # Slurm's warning (USR2) this many seconds before the time limit
      requeue: true                   # on the warning (or a preemption) checkpoint and requeue the job
      max_timeouts: 3                 # requeues after hitting the time limit (preemptions do not count)
      python: null                    # the command starting Python on the nodes; default: the submitting
                                      # interpreter (sys.executable at submit time)
      job_name: null                  # default ckd-<sweep id>
      ray_dashboard: true             # the Ray dashboard on the head (a port of its own): it serves the State
                                      # API, which Ray Train needs to release an early-stopped trial's workers

`time` takes Slurm's formats: minutes (an integer or "90"), "minutes:seconds", "hours:minutes:seconds",
"days-hours", "days-hours:minutes", "days-hours:minutes:seconds"; sbatch gets whole minutes (seconds are
rounded up, as Slurm does). An allocation gets `time`; a sweep longer than that continues in requeued
allocations (each restores the Tune experiment), up to `max_timeouts` times.

Every problem is reported with its key relative to the block (the grid loader prefixes `cluster.`):
`SlurmClusterSpec.from_mapping` (cluster.base.ClusterSpec's) raises `ClusterSpecError` (every problem at
once), and validators raise jobs.specbase's `Problems`, so the grid loader's `validation_issues` reports the
same keys. The trial-fit check (`trial_fit_problems`) is what `SlurmBackend.plan_problems` reports.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from cluster.base import ClusterSpec, ClusterSpecError
from jobs.specbase import Problems

__all__ = [
    "OWNED_SBATCH_OPTIONS", "SBATCH_SHORT_OPTIONS", "ClusterSpecError", "SlurmClusterSpec", "normalize_sbatch_key",
    "parse_slurm_time",
]  # fmt: skip

# Slurm's --signal takes at most 0xffff seconds.
MAX_SIGNAL_DELAY_S = 65535
# Seconds the allocation should run before the warning signal: starting Ray and the driver takes a while.
MIN_RUN_BEFORE_SIGNAL_S = 60

# sbatch options that ckd-orchestrate sets itself (long names, normalized), with the key to use instead.
OWNED_SBATCH_OPTIONS: dict[str, str] = {
    "job-name": "set job_name",
    "partition": "set partition",
    "account": "set account",
    "qos": "set qos",
    "time": "set time",
    "nodes": "set nodes",
    "ntasks": "the launcher runs one task per node (set nodes)",
    "ntasks-per-node": "the launcher runs one task per node (set nodes)",
    "cpus-per-task": "set cpus_per_task",
    "cpus-per-gpu": "set cpus_per_task (Ray gets cpus_per_task CPUs on each node)",
    "gpus-per-node": "set gpus_per_node",
    "gpus": "set gpus_per_node",
    "gpus-per-task": "set gpus_per_node",
    "mem": "set mem",
    "constraint": "set constraint",
    "exclude": "set exclude",
    "signal": "set signal_delay_s (the launcher checkpoints on USR2)",
    "requeue": "set requeue",
    "no-requeue": "set requeue",
    "output": "submitit writes the logs under <sweep>/slurm (see `ckd-orchestrate logs`)",
    "error": "submitit writes the logs under <sweep>/slurm (see `ckd-orchestrate logs`)",
    "open-mode": "submitit appends to its logs (requeued runs add to them)",
    "array": "one sweep is one Slurm job",
    "wrap": "the batch script is generated",
}
# sbatch's one-letter options, so that `{p: gpu}` is refused like `{partition: gpu}`.
SBATCH_SHORT_OPTIONS: dict[str, str] = {
    "A": "account", "C": "constraint", "G": "gpus", "J": "job-name", "N": "nodes", "a": "array", "c": "cpus-per-task",
    "e": "error", "n": "ntasks", "o": "output", "p": "partition", "q": "qos", "t": "time", "x": "exclude",
}  # fmt: skip
# Memory options that conflict with `mem` (Slurm takes one of --mem, --mem-per-cpu, --mem-per-gpu).
_MEM_OPTIONS = ("mem-per-cpu", "mem-per-gpu")

_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_MEM = re.compile(r"^\d+([KMGTkmgt][Bb]?)?$")
_TIME_FIELD = re.compile(r"^\d+$")
_TIME_EXAMPLES = '90 (minutes), "30:00", "4:00:00", "2-00:00:00"'


def normalize_sbatch_key(key: str) -> str:
    """An sbatch option as written in `sbatch_extra` ("--mail_user", "mail-user", "p") -> its long name
    without dashes ("mail-user", "partition")."""
    bare = key.strip().lstrip("-")
    if len(bare) == 1:
        return SBATCH_SHORT_OPTIONS.get(bare, bare)
    return bare.replace("_", "-").lower()


def parse_slurm_time(value: Any) -> int:
    """Seconds in a Slurm time limit (`sbatch --time`): minutes (int or "90"), "minutes:seconds",
    "hours:minutes:seconds", "days-hours", "days-hours:minutes" or "days-hours:minutes:seconds".

    Raises:
        ValueError: not one of those formats, a field out of range, or zero.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a Slurm time limit such as {_TIME_EXAMPLES}; got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"expected a positive number of minutes; got {value}")
        return value * 60
    text = value.strip()
    if text.upper() in ("INFINITE", "UNLIMITED"):
        raise ValueError(f"{value!r}: a finite time limit is needed (the launcher checkpoints before it and "
                         f"requeues); use e.g. {_TIME_EXAMPLES}")
    days_text, dash, rest = text.rpartition("-") if "-" in text else ("", "", text)
    parts = rest.split(":")
    fields = ([days_text] if dash else []) + parts
    if not all(_TIME_FIELD.match(f) for f in fields) or len(parts) > 3:
        raise ValueError(f"{value!r} is not a Slurm time limit; expected e.g. {_TIME_EXAMPLES}")
    numbers = [int(p) for p in parts]
    if dash:  # days-hours[:minutes[:seconds]]
        days = int(days_text)
        hours, minutes, seconds = (numbers + [0, 0])[:3]
        if hours >= 24 or minutes >= 60 or seconds >= 60:
            raise ValueError(f"{value!r}: hours must be < 24, minutes and seconds < 60 after 'days-'")
        total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    elif len(numbers) == 3:  # hours:minutes:seconds
        hours, minutes, seconds = numbers
        if minutes >= 60 or seconds >= 60:
            raise ValueError(f"{value!r}: minutes and seconds must be < 60 in hours:minutes:seconds")
        total = (hours * 60 + minutes) * 60 + seconds
    elif len(numbers) == 2:  # minutes:seconds
        minutes, seconds = numbers
        if seconds >= 60:
            raise ValueError(f"{value!r}: seconds must be < 60 in minutes:seconds")
        total = minutes * 60 + seconds
    else:  # minutes
        total = numbers[0] * 60
    if total <= 0:
        raise ValueError(f"{value!r}: the time limit must be positive")
    return total


def _single_line(value: str, what: str) -> str | None:
    if not value.strip():
        return f"{what} must not be empty"
    if "\n" in value or "\r" in value:
        return f"{what} must be one line"
    return None


def _check_setup_line(value: str) -> str:
    if msg := _single_line(value, "a setup line"):
        raise ValueError(msg)
    return value


_SetupLine = Annotated[str, AfterValidator(_check_setup_line)]


class SlurmClusterSpec(ClusterSpec):
    """The `cluster:` block of a grid run on Slurm: one job of `nodes` nodes, one task per node; the first
    task starts the Ray head and runs the sweep driver, the others join as Ray workers (see
    `cluster.slurm.launcher`). Submitted through submitit (`cluster.slurm.backend.SlurmBackend`)."""

    backend: Literal["slurm"] = "slurm"
    time: int | str = Field(description="walltime of one allocation, Slurm format (e.g. \"4:00:00\")")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = Field(1, ge=1)
    cpus_per_task: int = Field(2, ge=1, description="CPUs per node, all given to Ray")
    gpus_per_node: int = Field(0, ge=0)
    mem: int | str | None = Field(None, description="memory per node, sbatch --mem (e.g. 64G); int = MB")
    constraint: str | None = None
    exclude: str | None = None
    setup: list[_SetupLine] = Field(default_factory=list, description="shell lines run before Python starts")
    sbatch_extra: dict[str, Any] = Field(default_factory=dict, description="other sbatch options: name -> "
                                                                          "string, number or true (a flag)")
    signal_delay_s: int = Field(120, ge=1, le=MAX_SIGNAL_DELAY_S)
    requeue: bool = True
    max_timeouts: int = Field(3, ge=0, description="requeues after hitting the time limit")
    python: str | None = Field(None, description="shell command starting Python on the nodes; "
                                                 "default: the submitting interpreter")
    job_name: str | None = None
    ray_dashboard: bool = True

    # ---------------------------------------------------------------------------------- field checks

    @field_validator("time", mode="before")
    @classmethod
    def _check_time(cls, value: Any) -> Any:
        parse_slurm_time(value)  # raises ValueError with the formats
        return value.strip() if isinstance(value, str) else value

    @field_validator("partition", "account", "qos", "constraint", "exclude")
    @classmethod
    def _check_word(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            raise ValueError(f"expected a non-empty value without spaces; got {value!r}")
        return value

    @field_validator("mem", mode="before")
    @classmethod
    def _check_mem(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not _MEM.match(str(value).strip()):
            raise ValueError(f"expected sbatch --mem: an integer with an optional unit K, M, G or T "
                             f"(e.g. 16G, 500M; MB without a unit; 0 = all of the node's memory); got {value!r}")
        return value.strip() if isinstance(value, str) else value

    @field_validator("python", "job_name")
    @classmethod
    def _check_line(cls, value: str | None) -> str | None:
        if value is not None and (msg := _single_line(value, "the value")):
            raise ValueError(msg)
        return value

    @field_validator("sbatch_extra")
    @classmethod
    def _check_sbatch_extra(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems: list[tuple[str, str]] = []
        seen: dict[str, str] = {}
        for key, item in value.items():
            name = normalize_sbatch_key(key)
            if name in OWNED_SBATCH_OPTIONS:
                problems.append((key, f"sbatch --{name} is set by ckd-orchestrate: {OWNED_SBATCH_OPTIONS[name]}"))
            elif not _SBATCH_KEY.match(name):
                problems.append((key, "expected an sbatch long option name such as mail-type or reservation "
                                      "(without the leading --)"))
            elif name in seen:
                problems.append((key, f"the same sbatch option as {seen[name]!r}"))
            elif item is False:
                problems.append((key, "false is not an sbatch value; leave the option out"))
            elif not isinstance(item, (str, int, float)) or (isinstance(item, float) and not math.isfinite(item)):
                problems.append((key, f"expected a string, a number or true (a flag); got {item!r}"))
            elif isinstance(item, str) and (msg := _single_line(item, "the value")):
                problems.append((key, msg))
            seen.setdefault(name, key)
        if problems:
            raise Problems(problems)
        return value

    # ---------------------------------------------------------------------------------- cross checks

    @model_validator(mode="after")
    def _check(self) -> SlurmClusterSpec:
        problems: list[tuple[str, str]] = []
        walltime = parse_slurm_time(self.time)
        if self.signal_delay_s + MIN_RUN_BEFORE_SIGNAL_S > walltime:
            problems.append(("signal_delay_s", f"the warning {self.signal_delay_s} s before the time limit leaves "
                                               f"less than {MIN_RUN_BEFORE_SIGNAL_S} s of the {walltime} s "
                                               f"allocation to run; raise time or lower signal_delay_s"))
        if self.mem is not None:
            for key in self.sbatch_extra:
                if normalize_sbatch_key(key) in _MEM_OPTIONS:
                    problems.append((f"sbatch_extra.{key}", "Slurm takes one of --mem, --mem-per-cpu and "
                                                            "--mem-per-gpu; mem is set"))
        if problems:
            raise Problems(problems)
        return self

    # ---------------------------------------------------------------------------------- derived

    @property
    def time_seconds(self) -> int:
        return parse_slurm_time(self.time)

    @property
    def timeout_min(self) -> int:
        """The time limit in whole minutes (what sbatch gets; Slurm rounds seconds up too)."""
        return math.ceil(self.time_seconds / 60)

    @property
    def total_cpus(self) -> int:
        """Ray's logical CPUs over the allocation."""
        return self.nodes * self.cpus_per_task

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def sbatch_options(self) -> dict[str, Any]:
        """`sbatch_extra` under normalized long names ("mail_user" -> "mail-user")."""
        return {normalize_sbatch_key(k): v for k, v in self.sbatch_extra.items()}

    def trial_fit_problems(self, *, workers: int, cpus_per_worker: float, gpus_per_worker: float,
                           driver_cpus: float = 0.0) -> list[str]:
        """Why a trial of `workers` x (cpus, gpus) (+ its driver's CPUs) can never be placed on this
        allocation; [] when it fits. Ray places each worker on one node, so a worker must fit a node."""
        problems = []
        if cpus_per_worker > self.cpus_per_task:
            problems.append(f"a trial worker needs {cpus_per_worker:g} CPUs but a node has cpus_per_task = "
                            f"{self.cpus_per_task}")
        if gpus_per_worker > self.gpus_per_node:
            problems.append(f"a trial worker needs {gpus_per_worker:g} GPUs but a node has gpus_per_node = "
                            f"{self.gpus_per_node}")
        if workers * cpus_per_worker + driver_cpus > self.total_cpus:
            problems.append(f"a trial needs {workers} x {cpus_per_worker:g} CPUs (+{driver_cpus:g} for its driver) "
                            f"but the allocation has {self.nodes} x {self.cpus_per_task} CPUs")
        if workers * gpus_per_worker > self.total_gpus:
            problems.append(f"a trial needs {workers} x {gpus_per_worker:g} GPUs but the allocation has "
                            f"{self.nodes} x {self.gpus_per_node} GPUs")
        return problems


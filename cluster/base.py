"""Where a sweep's driver runs: the one interface every backend implements, and the plain values it trades.

The orchestrator decides *what* runs (a validated grid, a sweep directory, the driver's command line and
environment: a `DriverLaunch`); a backend decides *where* and *how* (a local process, an sbatch script,
a Ray job, a KubeRay RayJob). Only plain values cross that line:

    orchestrator ──DriverLaunch──► Backend.submit ──JobRef (a JSON mapping)──► stored in state.json by
    the orchestrator, handed back to Backend.status / logs / cancel / submit (a resume) ──► JobStatus

A backend never sees the grid, the sweep directory object or the driver's module: it gets its own
`cluster:` block (a `ClusterSpec`), a `DriverLaunch`, and the `JobRef` it returned before. This module
imports only the standard library and the strict-config kernel, so that validating a grid or running a
light command (`status`, `logs`, `cancel`) never imports a scheduler client, torch or Ray.

A new backend: a config model (a `ClusterSpec` with `backend: Literal["name"]`) and a `Backend` subclass,
one module each under `cluster/<name>/`, and one line in `BACKENDS`.
"""

from __future__ import annotations

import difflib
import enum
import importlib
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from pydantic import ValidationError

from jobs.specbase import StrictModel, key_messages

__all__ = [
    "BACKENDS", "Backend", "BackendUnavailable", "ClusterSpec", "ClusterSpecError", "DriverLaunch", "JobRef",
    "JobStatus", "SweepStatus", "TrialShape", "backend_class", "config_model",
]  # fmt: skip


class SweepStatus(str, enum.Enum):
    """Where a sweep (its driver's job) stands; a str so that it is written to state.json and MLflow as is."""

    PENDING = "pending"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (SweepStatus.FINISHED, SweepStatus.FAILED, SweepStatus.CANCELLED)

    def __str__(self) -> str:
        return self.value


# What a backend returned from `submit`: JSON-serialisable, always with "backend": <name>; the orchestrator
# keeps it in state.json under "backend" and passes it back on every later call.
JobRef = dict[str, Any]


@dataclass(frozen=True)
class DriverLaunch:
    """How to start the sweep driver, built once by `orchestrator.launch` and never re-derived by a backend.

    Attributes:
        sweep_id: the sweep's id (also the job's name where a backend names jobs).
        sweep_dir: the sweep directory as the backend's machines see it (`Backend.sweep_dir_for`).
        local_dir: the sweep directory on the submitting machine (its logs/, the backend's own files).
        argv: the driver's full command line, interpreter first.
        env: variables the driver's process needs (MLflow store, caches, the sweep record where the
            backend's machines do not share the sweep directory).
        tracking_uri: the MLflow store the sweep's runs go to, as resolved on the submitting machine.
        tracking_uri_set: whether the grid named that store itself (else it came from the environment or
            the default, which a backend with its own environment may override).
        packages: the project's top-level packages, for a backend that ships them (Ray's `py_modules`).
    """

    sweep_id: str
    sweep_dir: str
    local_dir: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    tracking_uri: str = ""
    tracking_uri_set: bool = False
    packages: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrialShape:
    """The generic resources of one trial (`sweep.resources`) as plain numbers, for a backend's fit checks."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    driver_cpus: float

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker + self.driver_cpus

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker


@dataclass(frozen=True)
class JobStatus:
    """What a backend knows of its job.

    Attributes:
        line: one line for `status` ("Slurm job 12: RUNNING on node1 (elapsed 0:03:10)"), or "" when there
            is nothing to add (a local driver).
        state: the sweep status the job implies, or None when the job cannot tell (unknown, or only the
            driver's own record knows); the orchestrator applies it only where its rules allow.
        requeued: the job was requeued and waits to start again (the sweep reads pending meanwhile).
    """

    line: str = ""
    state: SweepStatus | None = None
    requeued: bool = False


class ClusterSpecError(ValueError):
    """An invalid `cluster:` block. `issues` lists every problem as (key, message); keys are relative to
    the block (e.g. "worker.gpus"), "" for the block itself."""

    def __init__(self, issues: Sequence[tuple[str, str]]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(f"{k}: {m}" if k else m for k, m in self.issues))


class ClusterSpec(StrictModel):
    """The `cluster:` block of a grid; each backend's config model subclasses it with its own keys."""

    backend: str

    @classmethod
    def from_mapping(cls, data: Any) -> Self:
        """Validate a `cluster:` block on its own (a plain mapping, e.g. from YAML or sweep.json).

        Raises:
            ClusterSpecError: every problem, with its key relative to the block.
        """
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ClusterSpecError(key_messages(err, root=cls)) from None


class BackendUnavailable(RuntimeError):
    """A known backend whose modules or client libraries cannot be imported here."""


class Backend(ABC):
    """One place a sweep's driver can run. Subclasses fill the hooks; the orchestrator calls them.

    Args:
        spec: the grid's validated `cluster:` block for this backend.
    """

    name: ClassVar[str]
    # False where the backend's machines keep their own copy of the sweep directory (a remote Ray cluster,
    # a Kubernetes PVC): the orchestrator then fills this machine's state.json from MLflow.
    shares_sweep_dir: ClassVar[bool] = True

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec

    def sweep_dir_for(self, sweep_id: str, local_dir: str) -> str:
        """The sweep directory as the backend's machines see it."""
        return local_dir

    def interpreter(self) -> str:
        """The Python that runs the driver: this one, unless the backend's machines have their own."""
        return sys.executable

    def plan_problems(self, trial: TrialShape, launch: DriverLaunch) -> list[str]:
        """What stops the sweep before anything is queued (one message each, naming the key at fault)."""
        return []

    def capacity(self) -> tuple[float, float] | None:
        """(CPUs, GPUs) the sweep's trials share, where the backend knows them before anything starts (the
        local machine); None where they are only known once the job runs (an allocation, a cluster)."""
        return None

    def plan_text(self, launch: DriverLaunch) -> list[tuple[str, str]]:
        """(title, text) sections `plan` prints verbatim: what `submit` would hand to the scheduler."""
        return []

    @abstractmethod
    def submit(self, launch: DriverLaunch, previous: Mapping[str, Any] | None = None) -> JobRef:
        """Start the driver and return at once with the job's reference (`previous`: the job of an earlier
        attempt, given on a resume)."""

    @abstractmethod
    def status(self, job: Mapping[str, Any]) -> JobStatus:
        """The job's state as the backend sees it."""

    @abstractmethod
    def logs(self, job: Mapping[str, Any], tail: int | None) -> str | None:
        """The driver's log when the backend holds it (None: read the sweep's own logs/driver.log)."""

    @abstractmethod
    def cancel(self, job: Mapping[str, Any], timeout_s: float) -> None:
        """Stop the job and wait, up to `timeout_s`, until the backend says it has ended."""


# name -> (config model, backend class) as "module:attribute", imported on demand so that validating a
# grid loads only its own backend's config module and never a scheduler client.
BACKENDS: dict[str, tuple[str, str]] = {
    "local": ("cluster.local:LocalClusterSpec", "cluster.local:LocalBackend"),
    "slurm": ("cluster.slurm.config:SlurmClusterSpec", "cluster.slurm.backend:SlurmBackend"),
    "kubernetes": ("cluster.kubernetes.config:KubernetesClusterSpec", "cluster.kubernetes.backend:KubernetesBackend"),
    "ray": ("cluster.ray.config:RayClusterSpec", "cluster.ray.backend:RayBackend"),
}


def _known(name: str) -> tuple[str, str]:
    if name not in BACKENDS:
        hint = difflib.get_close_matches(str(name), BACKENDS, n=1)
        raise ValueError(f"unknown backend {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; expected one of: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def _load(target: str, backend: str) -> Any:
    module, _, attribute = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError as err:
        raise BackendUnavailable(f"the {backend} backend cannot be used here: {err}") from None


def config_model(name: str) -> type[ClusterSpec]:
    """The config model of backend `name`.

    Raises:
        ValueError: no such backend (the message lists the known ones).
        BackendUnavailable: its module cannot be imported.
    """
    return _load(_known(name)[0], name)


def backend_class(name: str) -> type[Backend]:
    """The `Backend` subclass of backend `name` (same errors as `config_model`)."""
    return _load(_known(name)[1], name)

"""`KubernetesClusterSpec`: the grid's `cluster:` block for `backend: kubernetes`, checked before anything
is rendered or sent.

    cluster:
      backend: kubernetes
      namespace: ml-sweeps                      # DNS-1123 label (default "default")
      image: registry.example.com/ckd:0.1.0     # must contain this project and Ray == ray_version
      service_account: ckd-sweeps
      head:   {cpu: "4", memory: 16Gi}          # no GPU: hosts the Ray job driver and the Tune trial drivers
      worker: {replicas: 2, cpu: "8", memory: 64Gi, gpus: 1}
      storage: {pvc: ckd-sweeps, mount_path: /sweeps}        # or {uri: s3://bucket/prefix}
      tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
      env: {MLFLOW_TRACKING_URI: http://mlflow.ml-sweeps:5000}

Every problem is reported with the key that caused it, relative to the `cluster:` block (the grid loader
prefixes `cluster.`): `KubernetesClusterSpec.from_mapping` (cluster.base.ClusterSpec's) raises
`ClusterSpecError` whose `issues` are (key, message) pairs, all problems at once. Validators raise
jobs.specbase's `Problems`, so the grid loader's `validation_issues` reports the same keys; so does
`issues_from_validation_error` for a model embedded in a larger one.

Names and quantities (cpu, memory) follow the Kubernetes grammar, checked by cluster.kubernetes.names.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from importlib import metadata
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from cluster.base import ClusterSpec
from cluster.kubernetes.names import (
    dns1123_label_error, dns1123_subdomain_error, env_name_error, label_problems, label_value_error,
    parse_quantity, positive_quantity, qualified_name_error,
)  # fmt: skip
# The spec kernel shared with jobs/ and orchestrator/: validators raise `Problems([(relative key, message)])`,
# which `jobs.specbase.validation_issues` (used by the grid loader) and `key_messages` turn into issues at the
# right sub-keys.
from jobs.specbase import StrictModel, key_messages, raise_if

__all__ = [
    "DEFAULT_MOUNT_PATH", "HeadSpec", "KubernetesClusterSpec", "OWNED_POD_SPEC_KEYS", "POD_SPEC_FIELDS",
    "RAY_AUTH_ENV", "SecretKeyRef", "StorageSpec", "Toleration", "WorkerSpec", "issues_from_validation_error",
]  # fmt: skip

INT32_MAX = 2**31 - 1
# Ray token authentication needs Ray >= 2.52 (KubeRay refuses authOptions.mode=token on older rayVersion).
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)
# Environment variables that carry or switch Ray's token authentication: set through `auth` and
# `auth_token_secret` (KubeRay injects them from a Secret), never as plain values in the manifest.
RAY_AUTH_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")

# Fields of a core/v1 PodSpec (the pod template's `spec`), as in KubeRay v1.7's CRD; the tests check this
# list against the CRD so a new Kubernetes field shows up as a test failure, not as a refused grid.
POD_SPEC_FIELDS = frozenset({
    "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers", "dnsConfig", "dnsPolicy",
    "enableServiceLinks", "ephemeralContainers", "hostAliases", "hostIPC", "hostNetwork", "hostPID", "hostUsers",
    "hostname", "hostnameOverride", "imagePullSecrets", "initContainers", "nodeName", "nodeSelector", "os",
    "overhead", "preemptionPolicy", "priority", "priorityClassName", "readinessGates", "resourceClaims",
    "resources", "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates", "schedulingGroup",
    "securityContext", "serviceAccount", "serviceAccountName", "setHostnameAsFQDN", "shareProcessNamespace",
    "subdomain", "terminationGracePeriodSeconds", "tolerations", "topologySpreadConstraints", "volumes",
})  # fmt: skip
# Pod spec keys the manifest sets itself (from first-class grid keys); `*_pod_extra` may not set them.
OWNED_POD_SPEC_KEYS = {
    "containers": "the Ray container is generated from image, head/worker resources and env",
    "volumes": "generated from storage.pvc (a volume without a mount in the Ray container has no use)",
    "serviceAccountName": "use service_account",
    "serviceAccount": "use service_account",
    "nodeSelector": "use node_selector (or head.node_selector / worker.node_selector)",
    "tolerations": "use tolerations (or head.tolerations / worker.tolerations)",
}
STORAGE_SCHEMES = ("s3", "gs")
DEFAULT_MOUNT_PATH = "/sweeps"
DEFAULT_TTL_SECONDS = 3600


# -------------------------------------------------------------------------------------------- models


class Toleration(StrictModel):
    """A core/v1 Toleration, with its Kubernetes field names."""

    key: str = ""
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str = ""
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = ""
    tolerationSeconds: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # noqa: N815 (k8s name)

    @model_validator(mode="after")
    def _check(self) -> Toleration:
        problems = []
        if self.key and (msg := qualified_name_error(self.key)):
            problems.append(("key", msg))
        if not self.key and self.operator != "Exists":
            problems.append(("operator", "a toleration without a key must use operator Exists (it matches every "
                                         "taint)"))
        if self.operator == "Exists" and self.value:
            problems.append(("value", "must be empty with operator Exists"))
        if self.operator == "Equal" and (msg := label_value_error(self.value)):
            problems.append(("value", msg))
        if self.tolerationSeconds is not None and self.effect != "NoExecute":
            problems.append(("tolerationSeconds", "only allowed with effect NoExecute"))
        raise_if(problems)
        return self

    def to_k8s(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.key:
            out["key"] = self.key
        out["operator"] = self.operator
        if self.value:
            out["value"] = self.value
        if self.effect:
            out["effect"] = self.effect
        if self.tolerationSeconds is not None:
            out["tolerationSeconds"] = self.tolerationSeconds
        return out


class _Placement(StrictModel):
    """Scheduling keys shared by the cluster block and each group (the group's add to the cluster's)."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)

    @field_validator("node_selector")
    @classmethod
    def _check_selector(cls, value: dict[str, str]) -> dict[str, str]:
        raise_if(label_problems(value))
        return value


class HeadSpec(_Placement):
    """The head pod: the Ray head, the job driver and the Tune trial drivers. It never gets a GPU."""

    cpu: str
    memory: str

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu(cls, value: Any) -> str:
        return positive_quantity(value, what="CPU")

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> str:
        return positive_quantity(value, what="memory", integral_bytes=True)

    @property
    def ray_num_cpus(self) -> int:
        """CPUs advertised to Ray: the limit rounded up, as KubeRay does when num-cpus is not set."""
        return math.ceil(parse_quantity(self.cpu).value)


class WorkerSpec(HeadSpec):
    """The one worker group: `replicas` pods (between min and max when autoscaling), each with `gpus`
    devices of `gpu_resource_name`."""

    replicas: int = Field(default=1, ge=0, le=INT32_MAX)
    min_replicas: int | None = Field(default=None, ge=0, le=INT32_MAX)
    max_replicas: int | None = Field(default=None, ge=0, le=INT32_MAX)
    gpus: int = Field(default=0, ge=0, le=INT32_MAX)
    gpu_resource_name: str = "nvidia.com/gpu"

    @field_validator("gpus", "replicas", "min_replicas", "max_replicas", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected a whole number; got {value!r}")
        return value

    @field_validator("gpu_resource_name")
    @classmethod
    def _check_gpu_name(cls, value: str) -> str:
        if msg := qualified_name_error(value):
            raise ValueError(msg)
        if "/" not in value or value.split("/", 1)[0].endswith("kubernetes.io"):
            raise ValueError(f"{value!r}: an extended resource name needs a vendor domain prefix, "
                             "e.g. nvidia.com/gpu or amd.com/gpu")
        return value

    @model_validator(mode="after")
    def _check_bounds(self) -> WorkerSpec:
        lo = self.min_replicas if self.min_replicas is not None else self.replicas
        hi = self.max_replicas if self.max_replicas is not None else self.replicas
        problems = []
        if lo > self.replicas:
            problems.append(("min_replicas", f"min_replicas ({lo}) is above replicas ({self.replicas})"))
        if hi < self.replicas:
            problems.append(("max_replicas", f"max_replicas ({hi}) is below replicas ({self.replicas})"))
        raise_if(problems)
        return self

    @property
    def replica_bounds(self) -> tuple[int, int]:
        lo = self.min_replicas if self.min_replicas is not None else self.replicas
        hi = self.max_replicas if self.max_replicas is not None else self.replicas
        return lo, hi

    @property
    def autoscaling(self) -> bool:
        lo, hi = self.replica_bounds
        return lo < hi


class StorageSpec(StrictModel):
    """Where the sweep root lives: a PersistentVolumeClaim mounted in every Ray pod at `mount_path` (default
    /sweeps), or an object-store URI (s3://..., gs://...) that Ray Tune and the driver read and write
    directly. (Unset defaults stay None, so a dumped spec validates again.)"""

    pvc: str | None = None
    mount_path: str | None = None
    uri: str | None = None

    @field_validator("pvc")
    @classmethod
    def _check_pvc(cls, value: str | None) -> str | None:
        if value is not None and (msg := dns1123_subdomain_error(value)):
            raise ValueError(msg)
        return value

    @field_validator("mount_path")
    @classmethod
    def _check_mount(cls, value: str | None) -> str | None:
        if value is None:
            return value
        value = value.rstrip("/")
        if not value.startswith("/") or ":" in value or "//" in value or "/../" in value + "/" or "/./" in value + "/":
            raise ValueError(f"{value!r}: expected an absolute path below / inside the container, e.g. /sweeps")
        return value

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, value: str | None) -> str | None:
        if value is None:
            return value
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in STORAGE_SCHEMES or not rest.strip("/"):
            examples = " or ".join(f"{s}://bucket/prefix" for s in STORAGE_SCHEMES)
            raise ValueError(f"{value!r}: expected an object-store URI, {examples}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _exactly_one(self) -> StorageSpec:
        if (self.pvc is None) == (self.uri is None):
            raise_if([("", "set exactly one of pvc (a PersistentVolumeClaim name) and uri (s3://... or gs://...)")])
        if self.uri is not None and self.mount_path is not None:
            raise_if([("mount_path", "only for storage.pvc")])
        return self

    @property
    def sweep_root(self) -> str:
        """The sweep root as the pods see it: the PVC's mount path or the URI."""
        return self.mount_dir if self.pvc is not None else str(self.uri)

    @property
    def mount_dir(self) -> str:
        """Where the PVC is mounted in the Ray containers."""
        return self.mount_path or DEFAULT_MOUNT_PATH

    def contains(self, sweep_dir: str) -> bool:
        """Whether `sweep_dir` lies under the sweep root (so every pod, and every retry, can reach it)."""
        root = self.sweep_root.rstrip("/")
        return sweep_dir == root or sweep_dir.startswith(root + "/")


class SecretKeyRef(StrictModel):
    """One key of a Kubernetes Secret, exposed to the Ray containers as an environment variable."""

    secret: str
    key: str

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: str) -> str:
        if msg := dns1123_subdomain_error(value):
            raise ValueError(msg)
        return value

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        if not re.fullmatch(r"[-._a-zA-Z0-9]{1,253}", value):
            raise ValueError(f"{value!r} is not a valid Secret key (letters, digits, '-', '_', '.')")
        return value


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(re.match(r"\d*", part).group() or 0) for part in version.split(".")[:3])


def _installed_ray_version() -> str:
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:  # pragma: no cover - ray is a dependency
        return "2.60.0"


class KubernetesClusterSpec(_Placement, ClusterSpec):
    """The `cluster:` block of a grid run on Kubernetes as a KubeRay `ray.io/v1` RayJob.

    The RayJob creates a Ray cluster (one head pod, one worker group), runs the sweep driver as its
    entrypoint, and is retried up to `backoff_limit` times, each retry on a new cluster: the driver then
    restores the sweep from its directory under `storage`. With `shutdown_after_job_finishes` the cluster is
    deleted when the job ends, and the RayJob `ttl_seconds_after_finished` (default 3600) later.

    Token authentication is on by default (`auth: token`): KubeRay generates a random token in a Secret and
    injects it into every Ray container (or uses `auth_token_secret`, a Secret with key `auth_token`).
    Tokens are never written into the manifest.
    """

    backend: Literal["kubernetes"]
    namespace: str = "default"
    image: str
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    ray_version: str = Field(default_factory=_installed_ray_version)
    service_account: str | None = None
    head: HeadSpec
    worker: WorkerSpec
    storage: StorageSpec
    labels: dict[str, str] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    secret_env: dict[str, SecretKeyRef] = Field(default_factory=dict)
    auth: Literal["token", "disabled"] = "token"
    auth_token_secret: str | None = None
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0, le=INT32_MAX)  # None: 3600
    backoff_limit: int = Field(default=2, ge=0, le=INT32_MAX)
    active_deadline_seconds: int | None = Field(default=None, gt=0, le=INT32_MAX)
    shutdown_after_job_finishes: bool = True
    submission_mode: Literal["K8sJobMode", "HTTPMode", "SidecarMode"] = "K8sJobMode"
    submitter_backoff_limit: int | None = Field(default=None, ge=0, le=INT32_MAX)
    entrypoint: str | None = None
    entrypoint_num_cpus: float | None = Field(default=None, ge=0)
    head_pod_extra: dict[str, Any] = Field(default_factory=dict)
    worker_pod_extra: dict[str, Any] = Field(default_factory=dict)
    use_kubectl: bool = False
    kube_context: str | None = None

    # ---------------------------------------------------------------------------------- field checks

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        if msg := dns1123_label_error(value):
            raise ValueError(msg)
        return value

    @field_validator("image")
    @classmethod
    def _check_image(cls, value: str) -> str:
        if not value or value != value.strip() or any(c.isspace() for c in value):
            raise ValueError(f"{value!r} is not a container image reference (e.g. registry.example.com/ckd:0.1.0)")
        return value

    @field_validator("ray_version", mode="before")
    @classmethod
    def _check_ray_version(cls, value: Any) -> Any:
        if not isinstance(value, str) or not re.fullmatch(r"\d+\.\d+\.\d+", value):
            raise ValueError(f"expected a Ray release like '2.60.0' (the Ray version inside image); got {value!r}")
        return value

    @field_validator("service_account", "auth_token_secret")
    @classmethod
    def _check_object_name(cls, value: str | None) -> str | None:
        if value is not None and (msg := dns1123_subdomain_error(value)):
            raise ValueError(msg)
        return value

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, value: dict[str, str]) -> dict[str, str]:
        problems = label_problems(value)
        problems += [(k, "app.kubernetes.io/* labels are set by ckd-orchestrate") for k in value
                     if k.startswith("app.kubernetes.io/")]
        raise_if(problems)
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: dict[str, str]) -> dict[str, str]:
        problems = [(k, msg) for k in value if (msg := env_name_error(k))]
        problems += [(k, "Ray's token authentication is configured with auth and auth_token_secret (a Secret); "
                         "a token must never be a plain value in the manifest") for k in value if k in RAY_AUTH_ENV]
        raise_if(problems)
        return value

    @field_validator("secret_env")
    @classmethod
    def _check_secret_env(cls, value: dict[str, SecretKeyRef]) -> dict[str, SecretKeyRef]:
        problems = [(k, msg) for k in value if (msg := env_name_error(k))]
        problems += [(k, "set through auth / auth_token_secret, which KubeRay wires into every Ray container")
                     for k in value if k in RAY_AUTH_ENV]
        raise_if(problems)
        return value

    @field_validator("head_pod_extra", "worker_pod_extra")
    @classmethod
    def _check_pod_extra(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems = []
        for key in value:
            if key in OWNED_POD_SPEC_KEYS:
                problems.append((key, "set by ckd-orchestrate and cannot be overridden here: "
                                      f"{OWNED_POD_SPEC_KEYS[key]}"))
            elif key not in POD_SPEC_FIELDS:
                hint = difflib.get_close_matches(key, sorted(POD_SPEC_FIELDS), n=1)
                suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
                problems.append((key, "not a Kubernetes PodSpec field" + suffix))
        raise_if(problems)
        return value

    # ---------------------------------------------------------------------------------- cross checks

    @model_validator(mode="after")
    def _check(self) -> KubernetesClusterSpec:
        problems: list[tuple[str, str]] = []
        both = set(self.env) & set(self.secret_env)
        problems += [(f"secret_env.{k}", "also set in env; keep one") for k in sorted(both)]
        if self.auth == "disabled" and self.auth_token_secret is not None:
            problems.append(("auth_token_secret", "only with auth: token"))
        if self.auth == "token":
            if _version_tuple(self.ray_version) < MIN_RAY_FOR_TOKEN_AUTH:
                problems.append(("ray_version", f"token authentication needs Ray >= 2.52.0; got {self.ray_version} "
                                                "(upgrade the image, or set auth: disabled)"))
        if not self.shutdown_after_job_finishes and self.ttl_seconds_after_finished:
            problems.append(("ttl_seconds_after_finished", "KubeRay only allows a TTL with "
                                                           "shutdown_after_job_finishes: true"))
        if self.submitter_backoff_limit is not None and self.submission_mode != "K8sJobMode":
            problems.append(("submitter_backoff_limit", "only with submission_mode: K8sJobMode (the submitter "
                                                        "is a Kubernetes Job only there)"))
        if self.submission_mode == "SidecarMode":
            policy = self.head_pod_extra.get("restartPolicy")
            if policy not in (None, "Never"):
                problems.append(("head_pod_extra.restartPolicy", "must be Never (or unset) with SidecarMode"))
        if self.entrypoint is not None and not self.entrypoint.strip():
            problems.append(("entrypoint", "must not be empty"))
        raise_if(problems)
        return self

    # ---------------------------------------------------------------------------------- derived

    @property
    def ttl_seconds(self) -> int | None:
        """ttlSecondsAfterFinished: None without shutdown_after_job_finishes (KubeRay forbids it there)."""
        if not self.shutdown_after_job_finishes:
            return None
        ttl = self.ttl_seconds_after_finished
        return DEFAULT_TTL_SECONDS if ttl is None else ttl

    def node_selector_for(self, group: Literal["head", "worker"]) -> dict[str, str]:
        return {**self.node_selector, **getattr(self, group).node_selector}

    def tolerations_for(self, group: Literal["head", "worker"]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for t in [*self.tolerations, *getattr(self, group).tolerations]:
            if (k8s := t.to_k8s()) not in out:
                out.append(k8s)
        return out


# ------------------------------------------------------------------------- pydantic -> (key, message)


def issues_from_validation_error(err: ValidationError, *, root: type[BaseModel] = KubernetesClusterSpec,
                                 prefix: Sequence[Any] = ()) -> list[tuple[str, str]]:
    """Turn a pydantic error of `root` (or of a model embedding it at `prefix`) into (key, message) pairs,
    keys relative to the `cluster:` block; unknown keys list the valid ones."""
    return key_messages(err, root=root, prefix=prefix)

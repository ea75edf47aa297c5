"""`RayJobClient`: submit a RayJob, read its state, tail its logs, cancel it (the API side of the
`kubernetes` backend, `cluster.kubernetes.backend.KubernetesBackend`).

Two transports with one behaviour: the `kubernetes` Python client (default; the optional extra
`ckd-orchestrate[kubernetes]`, imported only when a call needs it) or the `kubectl` binary
(`use_kubectl: true`). Credentials come from the kubeconfig (`kube_context`), or from the pod's service
account when running inside a cluster; nothing here reads or prints a token.

Permissions the caller needs in the namespace: rayjobs.ray.io create/get/delete, pods get/list,
pods/log get.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cluster.base import SweepStatus
from cluster.kubernetes.config import KubernetesClusterSpec
from cluster.kubernetes.manifest import (
    API_VERSION, GROUP, HEAD_CONTAINER, KIND, PLURAL, VERSION, check_manifest, to_yaml,
)  # fmt: skip

__all__ = [
    "KubernetesApiError", "KubernetesUnavailableError", "RayJobClient", "RayJobExistsError",
    "RayJobNotFoundError", "RayJobStatus", "job_state",
]  # fmt: skip

SIDECAR_SUBMITTER_CONTAINER = "ray-job-submitter"
# Ray's job status -> the sweep status, where KubeRay's deployment status does not decide it.
_RAY_JOB_STATES = {"RUNNING": SweepStatus.RUNNING, "SUCCEEDED": SweepStatus.FINISHED, "STOPPED": SweepStatus.CANCELLED,
                   "FAILED": SweepStatus.FAILED}
_PERMISSIONS_HINT = ("the identity in use needs rayjobs.ray.io create/get/delete, pods get/list and pods/log get "
                     "in the namespace")


class KubernetesUnavailableError(RuntimeError):
    """Neither the `kubernetes` package (or kubectl, with use_kubectl) nor a cluster configuration is there."""


class KubernetesApiError(RuntimeError):
    """The API server refused a request; `status` is its HTTP status (0 when kubectl gave none)."""

    def __init__(self, message: str, status: int = 0) -> None:
        self.status = status
        super().__init__(message)


class RayJobNotFoundError(KubernetesApiError, LookupError):
    """No RayJob of that name in the namespace (never submitted, cancelled, or removed by its TTL)."""


class RayJobExistsError(KubernetesApiError):
    """A RayJob of that name exists already (the same sweep id was submitted before)."""


# -------------------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class RayJobStatus:
    """What KubeRay reports in a RayJob's `.status`, plus `state`, the sweep status it implies."""

    name: str
    state: SweepStatus
    job_status: str = ""
    deployment_status: str = ""
    reason: str = ""
    message: str = ""
    ray_cluster_name: str = ""
    dashboard_url: str = ""
    failed_attempts: int = 0

    @property
    def terminal(self) -> bool:
        return self.state.is_terminal

    @classmethod
    def from_rayjob(cls, obj: Mapping[str, Any]) -> RayJobStatus:
        status = obj.get("status") or {}
        deployment, job = str(status.get("jobDeploymentStatus") or ""), str(status.get("jobStatus") or "")
        return cls(
            name=str((obj.get("metadata") or {}).get("name", "")),
            state=job_state(deployment, job),
            job_status=job,
            deployment_status=deployment,
            reason=str(status.get("reason") or ""),
            message=str(status.get("message") or ""),
            ray_cluster_name=str(status.get("rayClusterName") or ""),
            dashboard_url=str(status.get("dashboardURL") or ""),
            failed_attempts=int(status.get("failed") or 0),
        )


def job_state(deployment_status: str, job_status: str) -> SweepStatus:
    """Map KubeRay's jobDeploymentStatus and Ray's jobStatus to a sweep state.

    Complete is terminal with the Ray job's outcome (SUCCEEDED -> finished, STOPPED -> cancelled, otherwise
    failed); Failed and ValidationFailed are failed; Running and Retrying (a new cluster after a failure)
    are running; New (""), Initializing, Waiting, Suspending and Suspended are pending. An unknown
    deployment status falls back on the Ray job's status.
    """
    if deployment_status == "Complete":
        return {"SUCCEEDED": SweepStatus.FINISHED, "STOPPED": SweepStatus.CANCELLED}.get(job_status, SweepStatus.FAILED)
    if deployment_status in ("Failed", "ValidationFailed"):
        return SweepStatus.FAILED
    if deployment_status in ("Running", "Retrying"):
        return SweepStatus.RUNNING
    if deployment_status in ("", "Initializing", "Waiting", "Suspending", "Suspended"):
        return SweepStatus.PENDING
    return _RAY_JOB_STATES.get(job_status, SweepStatus.PENDING)


# ----------------------------------------------------------------------------------------- transports


class _Transport(Protocol):
    def create(self, manifest: Mapping[str, Any], *, dry_run: bool) -> dict[str, Any]: ...
    def get(self, name: str) -> dict[str, Any]: ...
    def delete(self, name: str) -> None: ...
    def list_pods(self, selector: str) -> list[dict[str, Any]]: ...
    def pod_log(self, pod: str, container: str | None, tail_lines: int | None) -> str: ...


def _import_kubernetes() -> Any:
    try:
        import kubernetes  # noqa: PLC0415 - optional dependency, imported on first use
    except ImportError:
        raise KubernetesUnavailableError(
            "the Kubernetes backend needs the `kubernetes` Python package: pip install 'ckd-orchestrate[kubernetes]' "
            "(or set cluster.use_kubectl: true to use kubectl)") from None
    return kubernetes


def _default_api_client(context: str | None) -> Any:
    """An ApiClient from the kubeconfig (its current context, or `context`), else the in-cluster service
    account. The kubeconfig location is the client's usual one ($KUBECONFIG or ~/.kube/config)."""
    kubernetes = _import_kubernetes()
    from kubernetes import config  # noqa: PLC0415

    try:
        return config.new_client_from_config(context=context)
    except config.ConfigException as kube_err:
        if context is not None:
            raise KubernetesUnavailableError(f"kubeconfig context {context!r}: {kube_err}") from None
        configuration = kubernetes.client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            raise KubernetesUnavailableError(
                f"no Kubernetes configuration: {kube_err} (and not running inside a cluster)") from None
        return kubernetes.client.ApiClient(configuration)


class _PythonClient:
    """The `kubernetes` package: CustomObjectsApi for the RayJob, CoreV1Api for pods and logs."""

    def __init__(self, namespace: str, api_client: Any, timeout: float) -> None:
        kubernetes = _import_kubernetes()
        self.namespace, self.timeout = namespace, timeout
        self._api_client = api_client
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._api_exception = kubernetes.client.exceptions.ApiException

    def _call(self, what: str, target: str, fn: Any, /, **kwargs: Any) -> Any:
        try:
            return fn(_request_timeout=self.timeout, **kwargs)
        except self._api_exception as err:
            raise _api_error(what, target, self.namespace, int(err.status or 0),
                             _server_message(err.body, err.reason)) from None

    def create(self, manifest: Mapping[str, Any], *, dry_run: bool) -> dict[str, Any]:
        extra = {"dry_run": "All"} if dry_run else {}
        return self._call("create", manifest["metadata"]["name"], self._custom.create_namespaced_custom_object,
                          group=GROUP, version=VERSION, namespace=self.namespace, plural=PLURAL,
                          body=dict(manifest), field_validation="Strict", **extra)

    def get(self, name: str) -> dict[str, Any]:
        return self._call("get", name, self._custom.get_namespaced_custom_object, group=GROUP, version=VERSION,
                          namespace=self.namespace, plural=PLURAL, name=name)

    def delete(self, name: str) -> None:
        self._call("delete", name, self._custom.delete_namespaced_custom_object, group=GROUP, version=VERSION,
                   namespace=self.namespace, plural=PLURAL, name=name, propagation_policy="Background")

    def list_pods(self, selector: str) -> list[dict[str, Any]]:
        pods = self._call("list pods of", selector, self._core.list_namespaced_pod, namespace=self.namespace,
                          label_selector=selector)
        return [self._api_client.sanitize_for_serialization(p) for p in pods.items]

    def pod_log(self, pod: str, container: str | None, tail_lines: int | None) -> str:
        kwargs: dict[str, Any] = {"name": pod, "namespace": self.namespace}
        if container:
            kwargs["container"] = container
        if tail_lines is not None:
            kwargs["tail_lines"] = tail_lines
        return str(self._call("read logs of", pod, self._core.read_namespaced_pod_log, **kwargs))


class _Kubectl:
    """The `kubectl` binary, with the same behaviour as `_PythonClient`."""

    def __init__(self, namespace: str, kubectl: str, context: str | None, timeout: float) -> None:
        path = shutil.which(kubectl)
        if path is None:
            raise KubernetesUnavailableError(f"{kubectl!r} not found on PATH (cluster.use_kubectl is true)")
        self.namespace, self.timeout = namespace, timeout
        self._base = [path, *(["--context", context] if context else []), "--namespace", namespace]

    def _run(self, what: str, name: str, args: Sequence[str], stdin: str | None = None) -> str:
        try:
            done = subprocess.run([*self._base, *args], input=stdin, capture_output=True, text=True,
                                  timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            raise KubernetesApiError(f"kubectl {what} {name}: no answer within {self.timeout:g} s") from None
        if done.returncode != 0:
            stderr = done.stderr.strip()
            status = 404 if "(NotFound)" in stderr else 409 if "(AlreadyExists)" in stderr else (
                403 if "(Forbidden)" in stderr else 422 if "(Invalid)" in stderr else 0)
            raise _api_error(what, name, self.namespace, status, stderr or f"kubectl exited with {done.returncode}")
        return done.stdout

    def create(self, manifest: Mapping[str, Any], *, dry_run: bool) -> dict[str, Any]:
        # `create`, not `apply`: like the Python client it refuses a RayJob that exists already, where
        # `apply` would patch a running job of the same sweep (KubeRay ignores most spec changes).
        args = ["create", "--validate=strict", "-f", "-", "-o", "json", *(["--dry-run=server"] if dry_run else [])]
        return json.loads(self._run("create", manifest["metadata"]["name"], args, stdin=to_yaml(manifest)))

    def get(self, name: str) -> dict[str, Any]:
        return json.loads(self._run("get", name, ["get", f"{PLURAL}.{GROUP}", name, "-o", "json"]))

    def delete(self, name: str) -> None:
        self._run("delete", name, ["delete", f"{PLURAL}.{GROUP}", name, "--wait=false"])

    def list_pods(self, selector: str) -> list[dict[str, Any]]:
        return list(json.loads(self._run("list pods of", selector, ["get", "pods", "-l", selector, "-o", "json"]))
                    .get("items") or [])

    def pod_log(self, pod: str, container: str | None, tail_lines: int | None) -> str:
        args = ["logs", pod, *(["-c", container] if container else []),
                *([f"--tail={tail_lines}"] if tail_lines is not None else [])]
        return self._run("read logs of", pod, args)


def _server_message(body: Any, reason: Any) -> str:
    """The `message` of a metav1.Status body, else the HTTP reason."""
    try:
        data = json.loads(body) if isinstance(body, (str, bytes)) else None
    except ValueError:
        data = None
    if isinstance(data, Mapping) and data.get("message"):
        return str(data["message"])
    return str(reason or body or "no message")


def _api_error(what: str, name: str, namespace: str, status: int, message: str) -> KubernetesApiError:
    text = f"{what} RayJob {name!r} in namespace {namespace!r}: {message}"
    if status == 404:
        return RayJobNotFoundError(text, status)
    if status == 409:
        return RayJobExistsError(f"{text} (a sweep with this id was submitted before: cancel it, or wait for "
                                 "its TTL, before submitting it again)", status)
    if status in (401, 403):
        return KubernetesApiError(f"{text} ({_PERMISSIONS_HINT})", status)
    return KubernetesApiError(text, status)


# ------------------------------------------------------------------------------------------- client


class RayJobClient:
    """Creates, reads, tails and deletes RayJobs in `spec.namespace`.

    Args:
        spec: the validated `cluster:` block (namespace, use_kubectl, kube_context, submission_mode).
        api_client: a `kubernetes.client.ApiClient` to use instead of one built from the kubeconfig.
        kubectl: the kubectl executable, with `spec.use_kubectl`.
        timeout: seconds for each request.
    """

    def __init__(self, spec: KubernetesClusterSpec, *, api_client: Any = None, kubectl: str = "kubectl",
                 timeout: float = 60.0) -> None:
        self.spec = spec
        self.namespace = spec.namespace
        self._api_client = api_client
        self._kubectl = kubectl
        self._timeout = timeout
        self._transport_cache: _Transport | None = None

    @property
    def _transport(self) -> _Transport:
        if self._transport_cache is None:
            if self.spec.use_kubectl:
                self._transport_cache = _Kubectl(self.namespace, self._kubectl, self.spec.kube_context, self._timeout)
            else:
                api_client = self._api_client or _default_api_client(self.spec.kube_context)
                self._transport_cache = _PythonClient(self.namespace, api_client, self._timeout)
        return self._transport_cache

    def submit(self, manifest: Mapping[str, Any], *, dry_run: bool = False) -> str:
        """Create the RayJob and return its name at once (KubeRay then starts the cluster and the job).

        Args:
            manifest: a manifest from `render_rayjob`; checked again before it is sent.
            dry_run: let the API server validate it (admission and schema) without creating anything.

        Raises:
            RayJobExistsError: a RayJob of that name exists (the sweep was submitted before).
            KubernetesApiError: the server refused it (its message says why).
        """
        if manifest.get("apiVersion") != API_VERSION or manifest.get("kind") != KIND:
            raise ValueError(f"expected a {API_VERSION} {KIND} manifest")
        namespace = (manifest.get("metadata") or {}).get("namespace", self.namespace)
        if namespace != self.namespace:
            raise ValueError(f"the manifest's namespace {namespace!r} is not the backend's {self.namespace!r}")
        check_manifest(manifest, gpu_resource_name=self.spec.worker.gpu_resource_name)
        created = self._transport.create(manifest, dry_run=dry_run)
        return str((created.get("metadata") or {}).get("name") or manifest["metadata"]["name"])

    def status(self, name: str) -> RayJobStatus:
        """The RayJob's state as KubeRay reports it.

        Raises:
            RayJobNotFoundError: no such RayJob (never submitted, cancelled, or past its TTL).
        """
        return RayJobStatus.from_rayjob(self._transport.get(name))

    def logs(self, name: str, *, tail_lines: int | None = None) -> str:
        """The job's output so far: the submitter's logs (`ray job submit` follows the Ray job's driver
        output there) in K8sJobMode and SidecarMode; the head pod's Ray container otherwise, or while no
        submitter pod exists. "" when no pod exists yet.

        Raises:
            RayJobNotFoundError: no such RayJob.
        """
        status = self.status(name)
        pod, container = None, None
        if self.spec.submission_mode == "K8sJobMode":
            pod = _newest(self._transport.list_pods(f"job-name={name}"))
        if pod is None and status.ray_cluster_name:
            pod = _newest(self._transport.list_pods(f"ray.io/cluster={status.ray_cluster_name},ray.io/node-type=head"))
            container = SIDECAR_SUBMITTER_CONTAINER if self.spec.submission_mode == "SidecarMode" else HEAD_CONTAINER
        if pod is None:
            return ""
        return self._transport.pod_log(pod, container, tail_lines)

    def cancel(self, name: str) -> None:
        """Delete the RayJob; Kubernetes then removes its Ray cluster and submitter (owner references).

        Raises:
            RayJobNotFoundError: no such RayJob.
        """
        self._transport.delete(name)


def _newest(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """The name of the most recently created pod (RFC 3339 timestamps sort as text), or None."""
    named = [p for p in pods if (p.get("metadata") or {}).get("name")]
    if not named:
        return None
    newest = max(named, key=lambda p: (str(p["metadata"].get("creationTimestamp") or ""), p["metadata"]["name"]))
    return str(newest["metadata"]["name"])

"""`KubernetesBackend` for `cluster: {backend: kubernetes, ...}`: the sweep driver as the entrypoint of a
KubeRay RayJob.

How the sweep reaches the pods: the image holds the project (KubeRay's submitter runs inside the cluster,
so a local working_dir could not be uploaded from here), and the driver's environment (`launch.env`, with
the sweep's record) travels in the job's runtime environment, `runtimeEnvYAML.env_vars`. KubeRay hands the
same runtimeEnvYAML to every attempt, so the entrypoint (`launch.argv`: the driver on `<storage>/<id>`
with `--bootstrap-env`) creates the sweep directory on the storage (the PVC) on the first attempt and
continues it, restoring Tune's state, when KubeRay retries the job on a new Ray cluster.

MLflow: the pods use `mlflow.tracking_uri`, else `cluster.env` / `cluster.secret_env`
MLFLOW_TRACKING_URI, else the submitting machine's MLFLOW_TRACKING_URI; a store that is a file on this
machine (the default SQLite) is refused, since no pod can reach it.

The job reference: {"backend": "kubernetes", "job_id": <RayJob name>, "namespace", "sweep_dir"}; `submit`
adds "tracking_uri", the store this machine reads the sweep's runs from, which the orchestrator keeps.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Mapping
from typing import Any

from cluster.base import Backend, DriverLaunch, JobRef, JobStatus, TrialShape
from cluster.kubernetes.client import RayJobClient, RayJobNotFoundError
from cluster.kubernetes.config import KubernetesClusterSpec
from cluster.kubernetes.manifest import render_rayjob, to_yaml

__all__ = ["KubernetesBackend"]

_TRACKING = "MLFLOW_TRACKING_URI"


class KubernetesBackend(Backend):
    """The `kubernetes` backend: submit, status, logs, cancel of the sweep's RayJob.

    Args:
        spec: the validated `cluster:` block.
        api_client: a `kubernetes.client.ApiClient` to use instead of the kubeconfig's (tests).
        kubectl: the kubectl executable, with `cluster.use_kubectl`.
    """

    name = "kubernetes"
    # The driver keeps its sweep directory on the cluster's storage: the orchestrator follows it in MLflow.
    shares_sweep_dir = False
    spec: KubernetesClusterSpec

    def __init__(self, spec: KubernetesClusterSpec, *, api_client: Any = None, kubectl: str = "kubectl") -> None:
        super().__init__(spec)
        self._api_client = api_client
        self._kubectl = kubectl

    def _client(self) -> RayJobClient:
        return RayJobClient(self.spec, api_client=self._api_client, kubectl=self._kubectl)

    def sweep_dir_for(self, sweep_id: str, local_dir: str) -> str:
        """Under the storage's sweep root (the PVC's mount path, or the object-store URI)."""
        return f"{self.spec.storage.sweep_root.rstrip('/')}/{sweep_id}"

    def interpreter(self) -> str:
        return "python"  # the image's Python

    def _pod_tracking_uri(self, launch: DriverLaunch) -> tuple[str | None, str | None]:
        """(the MLflow URI to put into the job's environment or None when the pods have it already, a problem)."""
        spec = self.spec
        if not launch.tracking_uri_set and (_TRACKING in spec.env or _TRACKING in spec.secret_env):
            return None, None  # the Ray containers carry it (cluster.env / cluster.secret_env)
        uri = launch.tracking_uri
        scheme = uri.split("://", 1)[0] if "://" in uri else "file"
        if scheme in ("sqlite", "file"):
            path = "/" + uri.split("://", 1)[-1].lstrip("/")
            if spec.storage.pvc is None or not spec.storage.contains(path):
                return uri, (f"mlflow.tracking_uri: the pods cannot reach {uri}, a file on this machine; set "
                             "mlflow.tracking_uri (or cluster.env / cluster.secret_env MLFLOW_TRACKING_URI) to an "
                             "MLflow server the pods reach")
        return uri, None

    def plan_problems(self, trial: TrialShape, launch: DriverLaunch) -> list[str]:
        """What stops a Kubernetes sweep before anything is sent (nothing here talks to the cluster)."""
        problems = []
        if self.spec.storage.uri is not None:
            problems.append("cluster.storage.uri: the sweep driver keeps its sweep directory on a file system; "
                            "use cluster.storage.pvc (an object-store sweep root is not supported by submit yet)")
        problem = self._pod_tracking_uri(launch)[1]
        if problem:
            problems.append(problem)
        return problems

    def manifest(self, launch: DriverLaunch) -> dict[str, Any]:
        """The RayJob that runs the sweep's driver as `launch` says; `plan` prints it, `submit` applies it.

        Raises:
            ValueError: a bad combination of grid and cluster settings (the message names the key).
        """
        uri, problem = self._pod_tracking_uri(launch)
        if problem:
            raise ValueError(problem)
        env_vars = {k: v for k, v in launch.env.items() if k != _TRACKING}
        if uri is not None:
            env_vars[_TRACKING] = uri
        return render_rayjob(self.spec, sweep_id=launch.sweep_id, sweep_dir=launch.sweep_dir,
                             runtime_env={"env_vars": env_vars}, entrypoint=shlex.join(launch.argv))

    def plan_text(self, launch: DriverLaunch) -> list[tuple[str, str]]:
        """The RayJob manifest `submit` would apply (placeholders for the sweep id and its record)."""
        try:
            manifest = self.manifest(launch)
        except ValueError:  # a grid the pods cannot run (listed under plan's problems): the bare RayJob
            manifest = render_rayjob(self.spec, sweep_id=launch.sweep_id, sweep_dir=launch.sweep_dir,
                                     entrypoint=shlex.join(launch.argv))
        return [("RayJob manifest", to_yaml(manifest))]

    def submit(self, launch: DriverLaunch, previous: Mapping[str, Any] | None = None) -> JobRef:
        """Apply the sweep's RayJob and return at once (KubeRay then starts the cluster and the job).

        Raises:
            ValueError: the grid cannot run on the pods (see `plan_problems`).
            RayJobExistsError: a RayJob for this sweep exists already.
            KubernetesApiError: the API server refused it (its message says why).
        """
        name = self._client().submit(self.manifest(launch))
        # Where `status` reads the trial table from here (a URI only in a Secret: this machine's own setting).
        uri = launch.tracking_uri if launch.tracking_uri_set else self.spec.env.get(_TRACKING) or launch.tracking_uri
        return {"backend": self.name, "job_id": name, "namespace": self.spec.namespace, "sweep_dir": launch.sweep_dir,
                "tracking_uri": uri}

    def status(self, job: Mapping[str, Any]) -> JobStatus:
        """One line on the RayJob and the sweep status KubeRay implies (the driver in the pods writes its own
        state.json, on the PVC, never this machine's)."""
        name = str(job.get("job_id") or "")
        where = f"RayJob {name} in namespace {self.spec.namespace}"
        try:
            status = self._client().status(name)
        except RayJobNotFoundError:
            return JobStatus(line=f"{where}: gone (cancelled, or removed after its TTL)")
        except Exception as err:  # the API server unreachable or refusing: say so, status goes on from MLflow
            return JobStatus(line=f"{where}: {err}")
        detail = "/".join(s for s in (status.deployment_status or "New", status.job_status) if s)
        line = f"{where}: {detail}"
        if status.failed_attempts:
            line += f", {status.failed_attempts} failed attempt(s)"
        if status.reason or status.message:
            line += f" ({' '.join(f'{status.reason} {status.message}'.split())[:300]})"
        return JobStatus(line=line, state=status.state)

    def logs(self, job: Mapping[str, Any], tail: int | None) -> str | None:
        """The job's output: the submitter pod's log (it follows the driver), else the head pod's."""
        return self._client().logs(str(job.get("job_id") or ""), tail_lines=tail)

    def cancel(self, job: Mapping[str, Any], timeout_s: float) -> None:
        """Delete the RayJob (Kubernetes then removes its Ray cluster) and wait, up to `timeout_s`, until
        the API server no longer has it."""
        name = str(job.get("job_id") or "")
        client = self._client()
        try:
            client.cancel(name)
        except RayJobNotFoundError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                client.status(name)
            except RayJobNotFoundError:
                return
            time.sleep(1)

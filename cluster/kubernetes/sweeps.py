"""`Sweeps` for `cluster: {backend: kubernetes, ...}`: the sweep driver as the entrypoint of a KubeRay RayJob.

How the sweep reaches the pods: the image holds the project (KubeRay's submitter runs inside the cluster,
so a local working_dir could not be uploaded from here), and the sweep's record (sweep.json + grid.yaml)
travels in the job's runtime environment, `runtimeEnvYAML.env_vars.CKD_SWEEP_RECORD`. KubeRay hands the
same runtimeEnvYAML to every attempt, so the entrypoint `python -m orchestrator.driver <storage>/<id>
--bootstrap-env CKD_SWEEP_RECORD` creates the sweep directory on the storage (the PVC) on the first
attempt and continues it, restoring Tune's state, when KubeRay retries the job on a new Ray cluster.

MLflow: the pods use `mlflow.tracking_uri`, else `cluster.env` / `cluster.secret_env`
MLFLOW_TRACKING_URI, else the submitting machine's MLFLOW_TRACKING_URI; a store that is a file on this
machine (the default SQLite) is refused, since no pod can reach it.
"""

from __future__ import annotations

import time
from typing import Any

from cluster.kubernetes.client import KubernetesBackend, RayJobNotFoundError
from cluster.kubernetes.manifest import default_entrypoint, render_rayjob
from orchestrator.state import SweepDir

__all__ = ["Sweeps", "plan_problems", "sweep_manifest"]

_TRACKING = "MLFLOW_TRACKING_URI"


def _pod_tracking_uri(grid: Any) -> tuple[str | None, str | None]:
    """(the MLflow URI to put into the job's environment or None when the pods have it already, a problem)."""
    spec = grid.cluster
    if grid.mlflow.tracking_uri is None and (_TRACKING in spec.env or _TRACKING in spec.secret_env):
        return None, None  # the Ray containers carry it (cluster.env / cluster.secret_env)
    uri = grid.tracking_uri()
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    if scheme in ("sqlite", "file"):
        path = "/" + uri.split("://", 1)[-1].lstrip("/")
        if spec.storage.pvc is None or not spec.storage.contains(path):
            return uri, (f"mlflow.tracking_uri: the pods cannot reach {uri}, a file on this machine; set "
                         "mlflow.tracking_uri (or cluster.env / cluster.secret_env MLFLOW_TRACKING_URI) to an "
                         "MLflow server the pods reach")
    return uri, None


def plan_problems(grid: Any) -> list[str]:
    """What stops a Kubernetes sweep before anything is sent (nothing here talks to the cluster)."""
    problems = []
    if grid.cluster.storage.uri is not None:
        problems.append("cluster.storage.uri: the sweep driver keeps its sweep directory on a file system; "
                        "use cluster.storage.pvc (an object-store sweep root is not supported by submit yet)")
    problem = _pod_tracking_uri(grid)[1]
    if problem:
        problems.append(problem)
    return problems


def sweep_manifest(grid: Any, sweep_id: str, record: str) -> dict[str, Any]:
    """The RayJob that runs sweep `sweep_id` of `grid`, carrying `record` (the sweep's record, see
    `orchestrator.driver.sweep_record`); `plan` prints it, `submit` applies it.

    Raises:
        ValueError: a bad combination of grid and cluster settings (the message names the key).
    """
    from orchestrator.driver import RECORD_ENV

    spec = grid.cluster
    target = f"{spec.storage.sweep_root.rstrip('/')}/{sweep_id}"
    uri, problem = _pod_tracking_uri(grid)
    if problem:
        raise ValueError(problem)
    env_vars = {RECORD_ENV: record, "CKD_CACHE_DIR": f"{target}/cache",
                # init_ray passes its own env_vars to ray.init; Ray refuses to merge them with the job's unless told.
                "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    if uri is not None:
        env_vars[_TRACKING] = uri
    return render_rayjob(spec, sweep_id=sweep_id, sweep_dir=target, runtime_env={"env_vars": env_vars},
                         entrypoint=spec.entrypoint or default_entrypoint(target, bootstrap_env=RECORD_ENV))


class Sweeps:
    """The `kubernetes` backend: submit, describe, driver_log, cancel (see orchestrator.submit).

    Args:
        api_client: a `kubernetes.client.ApiClient` to use instead of the kubeconfig's (tests).
        kubectl: the kubectl executable, with `cluster.use_kubectl`.
    """

    def __init__(self, api_client: Any = None, kubectl: str = "kubectl") -> None:
        self._api_client = api_client
        self._kubectl = kubectl

    def _backend(self, spec: Any) -> KubernetesBackend:
        return KubernetesBackend(spec, api_client=self._api_client, kubectl=self._kubectl)

    def _spec_and_name(self, sweep: SweepDir) -> tuple[Any, str]:
        from orchestrator.driver import load_grid_of

        backend = sweep.state().get("backend") or {}
        return load_grid_of(sweep).cluster, backend.get("job_id") or ""

    def submit(self, sweep: SweepDir, grid: Any) -> str:
        """Apply the sweep's RayJob and return its name at once (KubeRay then starts the cluster and the job).

        Raises:
            ValueError: the grid cannot run on the pods (see `plan_problems`).
            RayJobExistsError: a RayJob for this sweep exists already.
            KubernetesApiError: the API server refused it (its message says why).
        """
        from orchestrator.driver import sweep_record

        manifest = sweep_manifest(grid, sweep.sweep_id, sweep_record(sweep))
        name = self._backend(grid.cluster).submit(manifest)
        # Where `status` reads the trial table from here (a URI only in a Secret: this machine's own setting).
        uri = grid.mlflow.tracking_uri or grid.cluster.env.get(_TRACKING) or grid.tracking_uri()
        sweep.update_state(backend={"backend": "kubernetes", "job_id": name, "namespace": grid.cluster.namespace,
                                    "sweep_dir": f"{grid.cluster.storage.sweep_root.rstrip('/')}/{sweep.sweep_id}"},
                           tracking_uri=uri, experiment=grid.mlflow.experiment)
        return name

    def describe(self, sweep: SweepDir) -> tuple[str, str | None]:
        """One line on the RayJob, and "failed"/"cancelled" when KubeRay says it ended so while state.json
        (which the driver in the pods never writes: it has its own on the PVC) says pending/running.
        The parent run id, the champion and "finished" come from MLflow where it is reachable from here."""
        from cluster.ray.remote_state import sync_from_mlflow
        from orchestrator.driver import load_grid_of

        spec, name = self._spec_and_name(sweep)
        state = sweep.state()
        where = f"RayJob {name} in namespace {spec.namespace}"
        try:
            status = self._backend(spec).status(name)
        except RayJobNotFoundError:
            line, state_now = f"{where}: gone (cancelled, or removed after its TTL)", None
        except Exception as err:  # the API server unreachable or refusing: say so, status goes on from MLflow
            line, state_now = f"{where}: {err}", None
        else:
            state_now = status.state
            detail = "/".join(s for s in (status.deployment_status or "New", status.job_status) if s)
            line = f"{where}: {detail}"
            if status.failed_attempts:
                line += f", {status.failed_attempts} failed attempt(s)"
            if status.reason or status.message:
                line += f" ({' '.join(f'{status.reason} {status.message}'.split())[:300]})"
        if state.get("tracking_uri"):
            state = sync_from_mlflow(sweep, load_grid_of(sweep), state["tracking_uri"])
        if state_now == "running" and state.get("status") == "pending":
            state = sweep.update_state(status="running")
        if state.get("status") in ("pending", "running") and state_now in ("failed", "cancelled"):
            return line, state_now
        return line, None

    def driver_log(self, sweep: SweepDir, tail: int | None) -> str | None:
        """The job's output: the submitter pod's log (it follows the driver), else the head pod's."""
        spec, name = self._spec_and_name(sweep)
        return self._backend(spec).logs(name, tail_lines=tail)

    def cancel(self, sweep: SweepDir, timeout_s: float) -> None:
        """Delete the RayJob (Kubernetes then removes its Ray cluster) and wait, up to `timeout_s`, until
        the API server no longer has it."""
        spec, name = self._spec_and_name(sweep)
        backend = self._backend(spec)
        try:
            backend.cancel(name)
        except RayJobNotFoundError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                backend.status(name)
            except RayJobNotFoundError:
                return
            time.sleep(1)

"""Ray backend: a sweep's driver runs as a Ray job on an existing Ray cluster (the Ray Jobs API).

`Sweeps` is the backend interface the CLI calls (submit, describe, driver_log, cancel); `connect` builds a
`JobSubmissionClient` with the Ray token read the usual ways; `sync_from_mlflow` fills a submitting
machine's state.json from MLflow when the driver wrote its own on the cluster.
"""

from cluster.ray.connection import RayBackendError, auth_headers, connect, read_token
from cluster.ray.remote_state import sync_from_mlflow
from cluster.ray.sweeps import Sweeps, plan_problems

__all__ = ["RayBackendError", "Sweeps", "auth_headers", "connect", "plan_problems", "read_token", "sync_from_mlflow"]

"""Ray backend: a sweep's driver runs as a Ray job on an existing Ray cluster (the Ray Jobs API).

`RayClusterSpec` validates the grid's `cluster:` block; `RayBackend` submits, follows, tails and stops
the driver's job; `connect` builds a `JobSubmissionClient` with the Ray token read the usual ways.
Importing this package imports neither Ray nor the orchestrator.
"""

from cluster.ray.backend import RayBackend
from cluster.ray.config import RayClusterSpec
from cluster.ray.connection import RayBackendError, auth_headers, connect, read_token

__all__ = ["RayBackend", "RayBackendError", "RayClusterSpec", "auth_headers", "connect", "read_token"]

"""Kubernetes backend: a sweep runs as a KubeRay `ray.io/v1` RayJob.

`KubernetesClusterSpec` validates the grid's `cluster:` block, `render_rayjob` turns it into the RayJob
manifest (`to_yaml` for `plan`), `RayJobClient` creates, reads, tails and deletes it through the
`kubernetes` Python client (the optional extra `ckd-orchestrate[kubernetes]`) or `kubectl`, and
`KubernetesBackend` is the backend interface (cluster.base) the orchestrator calls.
"""

from cluster.base import ClusterSpecError
from cluster.kubernetes.backend import KubernetesBackend
from cluster.kubernetes.client import KubernetesUnavailableError, RayJobClient, RayJobNotFoundError, RayJobStatus
from cluster.kubernetes.config import KubernetesClusterSpec
from cluster.kubernetes.manifest import ManifestError, check_manifest, rayjob_name, render_rayjob, to_yaml
from cluster.kubernetes.names import Quantity, parse_quantity

__all__ = [
    "ClusterSpecError", "KubernetesBackend", "KubernetesClusterSpec", "KubernetesUnavailableError",
    "ManifestError", "Quantity", "RayJobClient", "RayJobNotFoundError", "RayJobStatus", "check_manifest",
    "parse_quantity",
    "rayjob_name", "render_rayjob", "to_yaml",
]  # fmt: skip

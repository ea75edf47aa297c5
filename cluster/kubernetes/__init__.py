"""Kubernetes backend: a sweep runs as a KubeRay `ray.io/v1` RayJob.

`KubernetesClusterSpec` validates the grid's `cluster:` block, `render_rayjob` turns it into the RayJob
manifest (`to_yaml` for `plan`), and `KubernetesBackend` submits, watches, tails and cancels it through
the `kubernetes` Python client (the optional extra `ckd-orchestrate[kubernetes]`) or `kubectl`.
"""

from cluster.kubernetes.client import KubernetesBackend, KubernetesUnavailableError, RayJobNotFoundError, RayJobStatus
from cluster.kubernetes.config import ClusterSpecError, KubernetesClusterSpec, Quantity, parse_quantity
from cluster.kubernetes.manifest import ManifestError, check_manifest, rayjob_name, render_rayjob, to_yaml

__all__ = [
    "ClusterSpecError", "KubernetesBackend", "KubernetesClusterSpec", "KubernetesUnavailableError",
    "ManifestError", "Quantity", "RayJobNotFoundError", "RayJobStatus", "check_manifest", "parse_quantity",
    "rayjob_name", "render_rayjob", "to_yaml",
]  # fmt: skip

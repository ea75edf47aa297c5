"""Slurm backend: a sweep runs as one Slurm job (submitit) with a Ray cluster over its nodes.

- `cluster.slurm.config.SlurmClusterSpec` validates the grid's `cluster:` block;
- `cluster.slurm.backend.SlurmBackend` (a `cluster.base.Backend`) submits the job, reads its state (squeue /
  sacct), finds its logs and cancels it, and renders the sbatch script and node commands for `plan`;
- `cluster.slurm.launcher.RayAllocation` is what runs on the nodes, with the per-node command lines in
  `cluster.slurm.commands` and the process handling in `cluster.slurm.processes`.

`cluster/slurm/testbed.sh` starts a real Slurm on one machine for tests and development.
"""

from cluster.slurm.config import ClusterSpecError, SlurmClusterSpec, parse_slurm_time

__all__ = [
    "ClusterSpecError", "SlurmBackend", "SlurmClusterSpec", "SlurmError", "SlurmJobStatus", "SlurmLogs",
    "SlurmUnavailableError", "parse_slurm_time",
]  # fmt: skip


def __getattr__(name: str):  # the backend imports submitit: only when asked for (grid validation needs config only)
    if name in ("SlurmBackend", "SlurmError", "SlurmJobStatus", "SlurmLogs", "SlurmUnavailableError"):
        from cluster.slurm import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'cluster.slurm' has no attribute {name!r}")

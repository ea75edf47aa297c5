"""Slurm backend: a sweep runs as one Slurm job (submitit) with a Ray cluster over its nodes.

`SlurmClusterSpec` validates the grid's `cluster:` block, `SlurmBackend` submits the job (`sbatch_script` and
`node_commands` for `plan`), reads its state (squeue / sacct), finds its logs and cancels it;
`cluster.slurm.launcher.RayAllocation` is what runs on the nodes; `cluster.slurm.sweeps.Sweeps` is what the CLI
(`submit`, `status`, `logs`, `cancel`) calls. `cluster/slurm/testbed.sh` starts a real Slurm on one machine for
tests and development.
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

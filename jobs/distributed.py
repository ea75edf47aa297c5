"""Process-group set-up for one job, wherever it runs.

The same training code runs in four places, which differ only in who creates the process group:

- one plain process (`ckd-orchestrate run job.yaml`): we create a 1-process group ourselves;
- N local processes (`--nproc N`): our launcher sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT;
- `srun`: Slurm sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the rendezvous is the first node;
- a Ray Train worker: Ray has already initialised torch.distributed.

DeepSpeed needs a process group in every case, so `init_distributed` always leaves one behind.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import socket
import subprocess
from typing import Any

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm_env() -> dict[str, str] | None:
    """torch.distributed variables derived from srun's, or None outside a multi-task srun step."""
    if "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return None
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                               text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        hosts = []
    job_id = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
    step_id = int(os.environ.get("SLURM_STEP_ID", "0") or 0)
    return {
        "RANK": os.environ["SLURM_PROCID"],
        "WORLD_SIZE": os.environ["SLURM_NTASKS"],
        "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": os.environ.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1"),
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(srun_master_port(job_id, step_id)),
    }


def srun_master_port(job_id: int, step_id: int) -> int:
    """The rendezvous port of an srun step: from the job and step ids, so that two jobs, or two steps of one
    allocation, sharing a node pick different ports; in [12000, 20000), below the port blocks the Slurm
    backend gives Ray (cluster/slurm/launcher.py) and Linux's ephemeral range."""
    return 12000 + (job_id * 31 + step_id) % 8000


def _pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_s: float = 1800.0) -> DistEnv:
    """Join (or create) the job's process group and pick this process's device.

    gloo on CPU, NCCL on GPUs. Idempotent: an existing group (Ray Train, a previous call) is reused.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return DistEnv(rank, world, local, _pick_device(local))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        slurm = _slurm_env() if "SLURM_PROCID" in os.environ and os.environ.get("SLURM_NTASKS", "1") != "1" else None
        if slurm is not None:
            os.environ.update(slurm)
        else:
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    os.environ.setdefault("LOCAL_RANK", "0")
    local = int(os.environ["LOCAL_RANK"])
    device = _pick_device(local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if is_loopback(os.environ["MASTER_ADDR"]):
        _init_loopback_group(backend, device, timeout)
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts a group created above
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, device)


def is_loopback(host: str) -> bool:
    """Whether `host` (MASTER_ADDR) names this machine's loopback interface: a single-node job."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def loopback_store(host: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """The job's rendezvous store with its server (rank 0) listening on `host`, a loopback address, only.

    torch's env:// rendezvous binds the TCPStore server to every interface whatever MASTER_ADDR says; here
    rank 0 binds the listening socket itself and hands it to the store (`master_listen_fd`)."""
    if rank != 0:
        return dist.TCPStore(host, port, world_size, False, timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1" if host == "localhost" else host, port))
        listener.listen(128)
        store = dist.TCPStore(host, port, world_size, True, timeout, master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    _listeners.append(listener)  # the store's server uses the descriptor: keep it open for the process's life
    return store


_listeners: list[socket.socket] = []


def _init_loopback_group(backend: str, device: torch.device, timeout: datetime.timedelta) -> None:
    """The process group of a single-node job, reachable from this machine only: the rendezvous store on
    loopback, and gloo's / NCCL's own sockets on the loopback interface (unless the user chose one)."""
    names = {name for _, name in socket.if_nameindex()}
    if "lo" in names:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = loopback_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world, timeout)
    kwargs: dict[str, Any] = {}
    if device.type == "cuda" and world > 1:  # as DeepSpeed does (a bound device for NCCL's communicators)
        kwargs["device_id"] = device
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **kwargs)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (a one-element list in a one-process job)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s value on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]

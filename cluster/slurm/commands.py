"""The command lines each node of a Slurm allocation runs, as pure functions (no process is started here).

- ports: each node takes a block of PORT_BLOCK consecutive ports in [PORT_RANGE_START, PORT_RANGE_END)
  (below Linux's ephemeral range, above Ray's default worker ports), the first block chosen from the job id
  and node index and checked free (`choose_ports`), the next free block otherwise; `NodePorts` names them;
- `ray_head_command` / `ray_worker_command`: `ray start --block` for node 0 and the others, with
  `ray_node_env` (token auth through a 0600 file, never on a command line);
- `driver_env`: what the launcher adds to the driver's environment (the allocation's Ray cluster, the
  restart count, the stop file);
- `node_memory`: Ray's --memory / --object-store-memory from Slurm's memory per node;
- the files of one run: `rendezvous_dir`, `ray_temp_dir` (the one function here that creates something: a
  private, unpredictable directory), and `requeue_marker` (written by the launcher when Slurm requeues the
  job, read by `SlurmBackend.status`);
- `allocation_plan`: all of the above as text for `plan`.

cluster.slurm.launcher runs these; tests and `plan` read them.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PORT_BLOCK", "PORT_RANGE_END", "PORT_RANGE_START", "NodePorts", "allocation_plan", "choose_ports",
    "dashboard_url", "driver_env", "node_memory", "port_block_order", "ray_head_command", "ray_node_env",
    "ray_temp_dir", "ray_worker_command", "rendezvous_dir", "requeue_marker",
]  # fmt: skip

# Ports: [20000, 32768) lies above Ray's default worker ports (10002-19999, used by other Ray clusters on a
# node) and below Linux's ephemeral range (32768-60999, used by outgoing connections).
PORT_RANGE_START = 20000
PORT_RANGE_END = 32768
PORT_BLOCK = 200
# Offsets in a block: 10 fixed ports, then the Ray worker processes' range.
_WORKER_PORT_OFFSET = 20


@dataclass(frozen=True)
class NodePorts:
    """The ports of one Ray node, a block of PORT_BLOCK consecutive ports starting at `base`."""

    base: int

    @property
    def gcs(self) -> int:  # the head's --port
        return self.base

    @property
    def node_manager(self) -> int:
        return self.base + 1

    @property
    def object_manager(self) -> int:
        return self.base + 2

    @property
    def ray_client_server(self) -> int:
        return self.base + 3

    @property
    def dashboard(self) -> int:
        return self.base + 4

    @property
    def dashboard_agent_listen(self) -> int:
        return self.base + 5

    @property
    def dashboard_agent_grpc(self) -> int:
        return self.base + 6

    @property
    def metrics_export(self) -> int:
        return self.base + 7

    @property
    def runtime_env_agent(self) -> int:
        return self.base + 8

    @property
    def min_worker(self) -> int:
        return self.base + _WORKER_PORT_OFFSET

    @property
    def max_worker(self) -> int:
        return self.base + PORT_BLOCK - 1

    def all(self) -> list[int]:
        return list(range(self.base, self.base + 9)) + list(range(self.min_worker, self.max_worker + 1))


def port_block_order(job_id: int, node_index: int) -> list[int]:
    """Block bases to try for a node, first choice first: a spread of (job id, node index) over the blocks in
    [PORT_RANGE_START, PORT_RANGE_END), then every other block in turn."""
    blocks = (PORT_RANGE_END - PORT_RANGE_START) // PORT_BLOCK
    first = (job_id * 2654435761 + node_index * 40503) % blocks  # Knuth's multiplicative hash spreads job ids
    return [PORT_RANGE_START + ((first + i) % blocks) * PORT_BLOCK for i in range(blocks)]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def choose_ports(job_id: int, node_index: int, *, skip: int = 0,
                 is_free: Callable[[int], bool] = _port_free) -> NodePorts:
    """The first block in `port_block_order` whose ports are all free (after skipping `skip` free blocks).

    Raises:
        RuntimeError: no free block.
    """
    for base in port_block_order(job_id, node_index):
        ports = NodePorts(base)
        if all(is_free(p) for p in ports.all()):
            if skip == 0:
                return ports
            skip -= 1
    raise RuntimeError(f"no free block of {PORT_BLOCK} ports in [{PORT_RANGE_START}, {PORT_RANGE_END}) on this node")


TEMP_ROOT = "/tmp"
# What `plan` shows for a node's Ray temp dir (its name is chosen on the node).
RAY_TEMP_PLACEHOLDER = f"{TEMP_ROOT}/ckd-<uid>/<random>"


def ray_temp_dir(root: str = TEMP_ROOT) -> str:
    """A new Ray temp dir for one node of one run, created here: `tempfile.mkdtemp` (a random name, mode
    0700, owned by this user) under the user's own base `<root>/ckd-<uid>` (created 0700). A base that is
    not a real directory of this user's, closed to others (another user created it first, or a symlink), is
    not used: the new directory then goes straight under `root`. Short (~23 characters): Ray's Unix socket
    paths (under it, in session_<date>_<pid>/sockets/) must stay under ~107 characters.

    Raises:
        OSError: `root` is not writable.
    """
    uid = os.getuid()
    base = os.path.join(root, f"ckd-{uid}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(base, 0o700)
    parent = root
    with contextlib.suppress(OSError):
        info = os.lstat(base)
        if stat.S_ISDIR(info.st_mode) and info.st_uid == uid:
            if info.st_mode & 0o077:
                os.chmod(base, 0o700)
            parent = base
    return tempfile.mkdtemp(prefix="r", dir=parent)


def rendezvous_dir(sweep_dir: str | Path, job_id: int | str, restart: int | str) -> Path:
    return Path(sweep_dir) / "slurm" / f"ray-{job_id}-{restart}"


def requeue_marker(sweep_dir: str | Path, job_id: int | str) -> Path:
    """The file node 0 writes when Slurm requeues job `job_id` under a run (`scontrol requeue`, a preemption
    with requeue) and removes when the next run starts: while it exists, the job waits for its next run."""
    return Path(sweep_dir) / "slurm" / f"requeued-{job_id}.json"


def _ray_cli(python: str) -> list[str]:
    return [python, "-m", "ray.scripts.scripts", "start"]


def _resource_flags(num_cpus: int, num_gpus: int, memory_bytes: int | None,
                    object_store_bytes: int | None) -> list[str]:
    flags = [f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}"]
    if memory_bytes is not None:
        flags.append(f"--memory={memory_bytes}")
    if object_store_bytes is not None:
        flags.append(f"--object-store-memory={object_store_bytes}")
    return flags


def _node_port_flags(ports: NodePorts) -> list[str]:
    return [
        f"--node-manager-port={ports.node_manager}", f"--object-manager-port={ports.object_manager}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent_listen}",
        f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc}", f"--metrics-export-port={ports.metrics_export}",
        f"--runtime-env-agent-port={ports.runtime_env_agent}", f"--min-worker-port={ports.min_worker}",
        f"--max-worker-port={ports.max_worker}",
    ]  # fmt: skip


def ray_head_command(*, python: str, ports: NodePorts, num_cpus: int, num_gpus: int, temp_dir: str,
                     node_ip: str | None = None, memory_bytes: int | None = None,
                     object_store_bytes: int | None = None, include_dashboard: bool = False,
                     dashboard_host: str = "127.0.0.1") -> list[str]:
    """`ray start --head --block` for node 0 (argv). The token is not an argument: see `ray_node_env`.

    The dashboard binds `dashboard_host`: the head's own address on a cluster, since Ray Train's workers on
    other nodes call its State API (see `dashboard_url`)."""
    cmd = _ray_cli(python) + ["--head", "--block"]
    if node_ip:
        cmd.append(f"--node-ip-address={node_ip}")
    cmd += [f"--port={ports.gcs}", f"--ray-client-server-port={ports.ray_client_server}"]
    cmd += _node_port_flags(ports)
    cmd += _resource_flags(num_cpus, num_gpus, memory_bytes, object_store_bytes)
    if include_dashboard:
        cmd += ["--include-dashboard=true", f"--dashboard-host={dashboard_host}", f"--dashboard-port={ports.dashboard}"]
    else:
        cmd.append("--include-dashboard=false")
    cmd += [f"--temp-dir={temp_dir}", "--disable-usage-stats", "--log-style=record", "--log-color=false"]
    return cmd


def ray_worker_command(*, python: str, head_address: str, ports: NodePorts, num_cpus: int, num_gpus: int,
                       temp_dir: str, node_ip: str | None = None, memory_bytes: int | None = None,
                       object_store_bytes: int | None = None) -> list[str]:
    """`ray start --address=<head> --block` for nodes 1.. (argv)."""
    cmd = _ray_cli(python) + [f"--address={head_address}", "--block"]
    if node_ip:
        cmd.append(f"--node-ip-address={node_ip}")
    cmd += _node_port_flags(ports)
    cmd += _resource_flags(num_cpus, num_gpus, memory_bytes, object_store_bytes)
    cmd += [f"--temp-dir={temp_dir}", "--disable-usage-stats", "--log-style=record", "--log-color=false"]
    return cmd


def ray_node_env(token_path: str | Path) -> dict[str, str]:
    """Environment added for `ray start` (and so for every Ray process of the node): token auth on, the token
    read from a 0600 file; no drain wait on SIGTERM (nothing here serves traffic; Slurm's KillWait is short)."""
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def dashboard_url(host: str | None, ports: NodePorts) -> str:
    """The head's dashboard as an http address (what the State API takes as RAY_ADDRESS)."""
    return f"http://{host or '127.0.0.1'}:{ports.dashboard}"


def driver_env(*, ray_address: str, token_path: str | Path, job_id: int | str, restart: int, num_nodes: int,
               stop_file: str | Path, dashboard: str | None = None) -> dict[str, str]:
    """Environment added for the driver: the allocation's Ray cluster and token, and how it was started.

    CKD_SLURM_RESTART is 0 on the first run and counts requeues; CKD_STOP_FILE exists once the launcher has
    asked the driver to stop for a requeue (walltime warning, preemption or `scontrol requeue`), before it
    stops the driver. CKD_RAY_DASHBOARD_URL (when the dashboard runs) is the address the driver hands its
    Ray workers as RAY_ADDRESS: Ray Train releases an early-stopped trial's workers through the State API,
    and auto-detecting the dashboard fails where another Ray runs on the same machine."""
    env = {
        "RAY_ADDRESS": ray_address,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0",
        "CKD_SLURM_JOB_ID": str(job_id),
        "CKD_SLURM_RESTART": str(restart),
        "CKD_RAY_NODES": str(num_nodes),
        "CKD_STOP_FILE": str(stop_file),
    }
    if dashboard:
        env["CKD_RAY_DASHBOARD_URL"] = dashboard
    return env


def node_memory(mem_per_node_mb: int | None) -> tuple[int | None, int | None]:
    """(Ray --memory, --object-store-memory) in bytes from Slurm's memory per node: 30% for the object store
    (Ray's default share), the rest for tasks; (None, None) when Slurm did not say (Ray then measures)."""
    if not mem_per_node_mb:
        return None, None
    total = mem_per_node_mb * 1024 * 1024
    store = max(int(total * 0.3), 80 * 1024 * 1024)
    return max(total - store, 0), store


def allocation_plan(*, sweep_dir: str | Path, driver_argv: Sequence[str], nodes: int, cpus_per_task: int,
                    gpus_per_node: int, include_dashboard: bool = False, python: str = "python", job_id: int = 0,
                    mem_per_node_mb: int | None = None) -> str:
    """The commands each node runs, as text for `plan`, with the ports an allocation with `job_id` would take
    when they are free (the launcher checks them at run time; `<...>` stands for what only the allocation
    knows).

    Args:
        sweep_dir: the sweep directory as the nodes see it.
        driver_argv: the driver's command line (the `DriverLaunch`'s), run on node 0 once every node joined.
        python: the interpreter starting Ray on the nodes.
    """
    restart = "<restart>"
    rdv = rendezvous_dir(sweep_dir, "<jobid>", restart)
    token = rdv / "token"
    memory, store = node_memory(mem_per_node_mb)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in ray_node_env(token).items())
    lines = [f"# Ray inside the allocation (ports shown for job id {job_id}; each node takes the first free block "
             f"of {PORT_BLOCK} ports from {PORT_RANGE_START}); token: a new 0600 file {token}"]
    head_ports = NodePorts(port_block_order(job_id, 0)[0])
    head = ray_head_command(python=python, ports=head_ports, num_cpus=cpus_per_task, num_gpus=gpus_per_node,
                            temp_dir=RAY_TEMP_PLACEHOLDER, node_ip="<node 0 ip>",
                            memory_bytes=memory, object_store_bytes=store, include_dashboard=include_dashboard,
                            dashboard_host="<node 0 ip>")
    lines += ["# node 0 (Ray head):", f"{env} {shlex.join(head)}"]
    if nodes > 1:
        worker = ray_worker_command(python=python, head_address=f"<node 0 ip>:{head_ports.gcs}",
                                    ports=NodePorts(port_block_order(job_id, 1)[0]), num_cpus=cpus_per_task,
                                    num_gpus=gpus_per_node, temp_dir=RAY_TEMP_PLACEHOLDER,
                                    node_ip="<node i ip>", memory_bytes=memory, object_store_bytes=store)
        lines += [f"# nodes 1..{nodes - 1} (Ray workers; each on its own port block):", f"{env} {shlex.join(worker)}"]
    denv = driver_env(ray_address=f"<node 0 ip>:{head_ports.gcs}", token_path=token, job_id="<jobid>", restart=0,
                      num_nodes=nodes, stop_file=rdv / "stop",
                      dashboard=dashboard_url("<node 0 ip>", head_ports) if include_dashboard else None)
    denv["CKD_SLURM_RESTART"] = restart
    lines += ["# node 0, once every node has joined (the driver):",
              " ".join(f"{k}={shlex.quote(v)}" for k, v in denv.items()) + " " + shlex.join(driver_argv)]
    return "\n".join(lines)

"""What runs inside a Slurm allocation: a Ray cluster over its nodes, then the sweep driver on the head.

submitit starts one task per node (`srun`, tasks_per_node=1), each calling the pickled `RayAllocation`:

- task 0 (node 0) writes a fresh Ray token into a 0600 file in the sweep directory, starts the Ray head
  (`ray start --head --block`) on ports chosen for this allocation, publishes its address, waits until every
  other node has joined, then runs the driver command (default `python -m orchestrator.driver <sweep_dir>`)
  with RAY_ADDRESS set, and finally stops the Ray processes it started (its own `ray start --block`, which
  takes its raylet, GCS and workers with it; never a machine-wide `ray stop`);
- every other task waits for the head's address, starts a Ray worker node joined to it, and stops it when
  the head says the driver is done.

Rendezvous goes through `<sweep_dir>/slurm/ray-<job id>-<restart>/` (the sweep directory is on the shared
file system anyway): `token` (0600, in a 0700 directory), `head.json`, `node-<i>.ready`, `node-<i>.stopped`,
`done`, `stop`. The token never appears on a command line; Ray processes and the driver read it through
RAY_AUTH_TOKEN_PATH (with RAY_AUTH_MODE=token).

Ports: each node takes a block of PORT_BLOCK consecutive ports in [PORT_RANGE_START, PORT_RANGE_END) (below
Linux's ephemeral range, above Ray's default worker ports), the first block chosen from the job id and node
index and checked free, the next free block otherwise; two users' allocations on one node (and the testbed's
emulated nodes, which share a host) get different blocks. Temp dirs are short (`/tmp/ckd-<job>-<restart>-<node>`,
Ray's Unix sockets live there) and removed at the end.

Walltime and preemption: submitit installs a USR2 handler (the sbatch script has `--signal=USR2@<delay>`);
on task 0 it calls `RayAllocation.checkpoint`, which creates the `stop` file (its path is CKD_STOP_FILE in
the driver's environment), sends the driver SIGINT (Ray Tune saves the experiment and returns from fit),
waits for it, stops Ray, and hands submitit the same callable to requeue (`scontrol requeue`). The requeued
job (same job id, SLURM_RESTART_COUNT + 1) starts everything again and the driver restores the experiment
(Tuner.restore). Children are started with USR2 ignored, so Slurm's signal reaches only the launcher.
`scontrol requeue` (or a node failure) sends SIGTERM instead: Ray shuts down, the driver is killed, and the
requeued job restores from the last saved experiment state. On such a SIGTERM, task 0 asks Slurm whether the
job is being requeued (its restart count is then already ahead); if so it creates the stop file and, once the
driver is gone, records the sweep in state.json as pending (waiting for the next run) rather than cancelled.

The driver's output goes to the sweep's logs/driver.log (appended by every run), which `ckd-orchestrate logs`
reads; the launcher's and Ray's own output stays in submitit's per-task logs.

The per-node command lines are pure functions (`ray_head_command`, `ray_worker_command`, `driver_command`,
`allocation_plan`), so that `plan` prints them and tests check them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from jobs.storage import write_json_atomic

__all__ = [
    "PORT_BLOCK", "PORT_RANGE_END", "PORT_RANGE_START", "DriverFailed", "NodePorts", "RayAllocation", "SlurmEnv",
    "allocation_plan", "choose_ports", "dashboard_url", "driver_command", "driver_env", "port_block_order",
    "ray_head_command", "ray_node_env", "ray_temp_dir", "ray_worker_command", "rendezvous_dir",
]  # fmt: skip

# Ports: [20000, 32768) lies above Ray's default worker ports (10002-19999, used by other Ray clusters on a
# node) and below Linux's ephemeral range (32768-60999, used by outgoing connections).
PORT_RANGE_START = 20000
PORT_RANGE_END = 32768
PORT_BLOCK = 200
# Offsets in a block: 10 fixed ports, then the Ray worker processes' range.
_WORKER_PORT_OFFSET = 20
START_ATTEMPTS = 3  # port blocks tried when `ray start` fails (another process took a port meanwhile)
RAY_STARTED_MARKER = "Ray runtime started"
# The stop signal for the driver: Ray Tune catches SIGINT, saves the experiment state and returns from fit().
DRIVER_STOP_SIGNAL = signal.SIGINT
# Seconds kept back from signal_delay_s for stopping Ray and requeueing after the driver has stopped.
_TEARDOWN_RESERVE_S = 30


class DriverFailed(RuntimeError):
    """The driver command exited with a non-zero status (the Slurm job then fails)."""

    def __init__(self, returncode: int, command: Sequence[str]) -> None:
        self.returncode = returncode
        super().__init__(f"the driver exited with status {returncode}: {shlex.join(command)}")


# ------------------------------------------------------------------------------------------ pure parts


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


def ray_temp_dir(job_id: int | str, restart: int | str, node_index: int | str) -> str:
    """A short per-node Ray temp dir (Ray's Unix socket paths must stay under ~107 characters)."""
    return f"/tmp/ckd-{job_id}-{restart}-{node_index}"


def rendezvous_dir(sweep_dir: str | Path, job_id: int | str, restart: int | str) -> Path:
    return Path(sweep_dir) / "slurm" / f"ray-{job_id}-{restart}"


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


def driver_command(python: str, sweep_dir: str | Path) -> list[str]:
    """The sweep driver, as started by every backend."""
    return [python, "-m", "orchestrator.driver", str(sweep_dir)]


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


def allocation_plan(*, sweep_dir: str | Path, nodes: int, cpus_per_task: int, gpus_per_node: int,
                    include_dashboard: bool = False, python: str = "python", job_id: int = 0,
                    command: Sequence[str] | None = None, mem_per_node_mb: int | None = None) -> str:
    """The commands each node runs, as text for `plan`, with the ports an allocation with `job_id` would take
    when they are free (the launcher checks them at run time; `<...>` stands for what only the allocation
    knows)."""
    restart = "<restart>"
    rdv = rendezvous_dir(sweep_dir, "<jobid>", restart)
    token = rdv / "token"
    memory, store = node_memory(mem_per_node_mb)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in ray_node_env(token).items())
    lines = [f"# Ray inside the allocation (ports shown for job id {job_id}; each node takes the first free block "
             f"of {PORT_BLOCK} ports from {PORT_RANGE_START}); token: a new 0600 file {token}"]
    head_ports = NodePorts(port_block_order(job_id, 0)[0])
    head = ray_head_command(python=python, ports=head_ports, num_cpus=cpus_per_task, num_gpus=gpus_per_node,
                            temp_dir=ray_temp_dir("<jobid>", restart, 0), node_ip="<node 0 ip>",
                            memory_bytes=memory, object_store_bytes=store, include_dashboard=include_dashboard,
                            dashboard_host="<node 0 ip>")
    lines += ["# node 0 (Ray head):", f"{env} {shlex.join(head)}"]
    if nodes > 1:
        worker = ray_worker_command(python=python, head_address=f"<node 0 ip>:{head_ports.gcs}",
                                    ports=NodePorts(port_block_order(job_id, 1)[0]), num_cpus=cpus_per_task,
                                    num_gpus=gpus_per_node, temp_dir=ray_temp_dir("<jobid>", restart, "<i>"),
                                    node_ip="<node i ip>", memory_bytes=memory, object_store_bytes=store)
        lines += [f"# nodes 1..{nodes - 1} (Ray workers; each on its own port block):", f"{env} {shlex.join(worker)}"]
    denv = driver_env(ray_address=f"<node 0 ip>:{head_ports.gcs}", token_path=token, job_id="<jobid>", restart=0,
                      num_nodes=nodes, stop_file=rdv / "stop",
                      dashboard=dashboard_url("<node 0 ip>", head_ports) if include_dashboard else None)
    denv["CKD_SLURM_RESTART"] = restart
    drv = list(command) if command is not None else driver_command(python, sweep_dir)
    lines += ["# node 0, once every node has joined (the driver):",
              " ".join(f"{k}={shlex.quote(v)}" for k, v in denv.items()) + " " + shlex.join(drv)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the environment


@dataclass(frozen=True)
class SlurmEnv:
    """What the launcher reads from Slurm's environment (resolved once, at the edge)."""

    job_id: int
    restart: int
    node_index: int
    num_nodes: int
    cpus: int
    mem_per_node_mb: int | None
    node_name: str

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SlurmEnv:
        env = os.environ if environ is None else environ
        cpus = env.get("SLURM_CPUS_PER_TASK") or env.get("SLURM_CPUS_ON_NODE") or str(os.cpu_count() or 1)
        mem: int | None = None
        if env.get("SLURM_MEM_PER_NODE"):
            mem = int(env["SLURM_MEM_PER_NODE"])
        elif env.get("SLURM_MEM_PER_CPU"):
            mem = int(env["SLURM_MEM_PER_CPU"]) * int(env.get("SLURM_CPUS_ON_NODE") or cpus)
        return cls(
            job_id=int(env["SLURM_JOB_ID"]),
            restart=int(env.get("SLURM_RESTART_COUNT") or 0),
            node_index=int(env.get("SLURM_NODEID") or 0),
            num_nodes=int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1),
            cpus=int(cpus),
            mem_per_node_mb=mem,
            node_name=env.get("SLURMD_NODENAME") or socket.gethostname(),
        )


def _node_ip(name: str) -> str | None:
    """This node's address as the other nodes reach it: its Slurm node name resolved; None (Ray then takes the
    address of the default route) when it does not resolve or resolves to loopback (a "127.0.1.1 <host>" line
    in /etc/hosts would make the head unreachable from other nodes)."""
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return None
    return None if address.startswith("127.") else address


def _log(message: str) -> None:
    print(f"[ckd-launcher {time.strftime('%H:%M:%S')}] {message}", flush=True)


# Environment variables never passed on from the submitting shell (sbatch exports it): the allocation has its
# own Ray cluster and token.
_DROPPED_ENV = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")


def _spawn(cmd: Sequence[str], extra_env: Mapping[str, str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start `cmd` with USR2 ignored (inherited through exec by everything it starts): Slurm's walltime warning
    must reach only the launcher, which stops things in order (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env.update(extra_env)
    wrapped = ["/bin/sh", "-c", 'trap "" USR2; exec "$@"', "sh", *cmd]
    return subprocess.Popen(wrapped, env=env, stdin=subprocess.DEVNULL, **kwargs)


def _gone(proc: subprocess.Popen[Any]) -> bool:
    """Whether `proc` has exited; safe inside a signal handler that interrupted a poll() of the same process
    (Popen's wait lock is then held, so /proc tells instead)."""
    if proc.poll() is not None:
        return True
    try:
        with open(f"/proc/{proc.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _wait_gone(proc: subprocess.Popen[Any], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not _gone(proc):
        if time.monotonic() >= end:
            return False
        time.sleep(0.1)
    return True


def _stop(proc: subprocess.Popen[Any] | None, what: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Send `sig`, wait up to `timeout` s, then SIGKILL."""
    if proc is None or _gone(proc):
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    if not _wait_gone(proc, timeout):
        _log(f"{what} (pid {proc.pid}) still running {timeout:.0f} s after {signal.Signals(sig).name}; SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        _wait_gone(proc, 10)
    proc.poll()  # reap it when no one else holds Popen's wait lock (sets returncode)


def _become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux PR_SET_CHILD_SUBREAPER): a Ray process
    whose parent dies (raylet agents when the raylet is killed) stays under the launcher, so that Slurm's
    process tracking still sees it (proctrack/linuxproc follows parent links) and the teardown finds it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) for every process."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                table[int(entry.name)] = (int(fields[1]), fields[0])
            except (OSError, IndexError, ValueError):
                continue
    return table


def _descendants(pid: int) -> list[int]:
    """Living (not zombie) descendants of `pid`."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        todo += children.get(child, [])
        if table.get(child, (0, "Z"))[1] not in ("Z", "X"):
            found.append(child)
    return found


def _kill_descendants(timeout: float) -> None:
    """SIGTERM whatever this process still has below it (Ray processes orphaned by a killed parent), then
    SIGKILL after `timeout` seconds; reap the orphans that were handed to us."""
    me = os.getpid()
    left = _descendants(me)
    if left:
        _log(f"stopping {len(left)} leftover process(es) of this node: {left}")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            end = time.monotonic() + (timeout if sig == signal.SIGTERM else 5)
            while (left := _descendants(me)) and time.monotonic() < end:
                time.sleep(0.1)
            if not left:
                break
    table = _process_table()
    for pid, (parent, state) in table.items():  # orphans handed to us exit as our zombies
        if parent == me and state == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _write_private(path: Path, text: str) -> None:
    """Create `path` with mode 0600 (never readable by others, not even briefly)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _wait_for(what: str, check: Callable[[], Any], timeout: float, *, alive: Callable[[], bool] | None = None,
              interval: float = 0.5) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if alive is not None and not alive():
            raise RuntimeError(f"gave up waiting for {what}: the process it depends on exited")
        if time.monotonic() >= end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class _RayNode:
    """One `ray start --block` process; its output is copied to this task's stdout with a prefix."""

    def __init__(self, cmd: list[str], env: Mapping[str, str], label: str) -> None:
        self.cmd = cmd
        self.label = label
        self.started = threading.Event()
        self.proc = _spawn(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _pump(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            if RAY_STARTED_MARKER in line:
                self.started.set()
            sys.stdout.write(f"[{self.label}] {line}")
            sys.stdout.flush()

    def wait_started(self, timeout: float) -> bool:
        """True once Ray says it started; False if the process exited first or `timeout` passed."""
        end = time.monotonic() + timeout
        while not self.started.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() >= end:
                return self.started.is_set()
        return True

    def stop(self, timeout: float = 30.0) -> None:
        _stop(self.proc, f"ray start ({self.label})", timeout=timeout)
        self._reader.join(timeout=5)


# ------------------------------------------------------------------------------------------ the callable


class RayAllocation:
    """The callable submitit runs once per node (one task per node); see the module docstring.

    Args:
        sweep_dir: the sweep directory (on a file system every node sees).
        command: the driver command (argv), run on node 0; default `python -m orchestrator.driver <sweep_dir>`
            with the interpreter running this task.
        gpus_per_node: Ray's --num-gpus on each node (CPUs come from SLURM_CPUS_PER_TASK).
        include_dashboard: start the Ray dashboard on the head.
        requeue: on Slurm's warning signal, checkpoint and requeue (else stop the driver and end).
        signal_delay_s: how long before the time limit the warning comes (bounds the driver's grace time).
        start_timeout_s: how long a node waits for Ray to start, for the head's address, or for all nodes.
        driver_log: a file the driver's stdout and stderr are appended to (the sweep's logs/driver.log, which
            `ckd-orchestrate logs` reads on the shared file system); None: this task's own output.
    """

    def __init__(self, sweep_dir: str | Path, command: Sequence[str] | None = None, *, gpus_per_node: int = 0,
                 include_dashboard: bool = False, requeue: bool = True, signal_delay_s: int = 120,
                 start_timeout_s: float = 600.0, driver_log: str | Path | None = None) -> None:
        self.sweep_dir = str(Path(sweep_dir).resolve())
        self.command = list(command) if command is not None else None
        self.gpus_per_node = gpus_per_node
        self.include_dashboard = include_dashboard
        self.requeue = requeue
        self.signal_delay_s = signal_delay_s
        self.start_timeout_s = start_timeout_s
        self.driver_log = str(driver_log) if driver_log is not None else None
        self._runtime: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # the running processes are not part of a checkpoint
        state = dict(self.__dict__)
        state["_runtime"] = {}
        return state

    # ---------------------------------------------------------------------------------------- submitit

    def __call__(self) -> int:
        env = SlurmEnv.from_environ()
        self._runtime["env"] = env
        _log(f"job {env.job_id} restart {env.restart}: node {env.node_index}/{env.num_nodes} ({env.node_name}), "
             f"{env.cpus} CPUs, {self.gpus_per_node} GPUs, memory {env.mem_per_node_mb} MB")
        # scancel, `scontrol requeue`, preemption and the time limit itself send SIGTERM to every process of the
        # job (then SIGKILL after KillWait): clean up quickly (submitit itself would ignore it).
        signal.signal(signal.SIGTERM, self._terminated)
        _become_subreaper()
        if env.node_index == 0:
            return self._run_head(env)
        return self._run_worker(env)

    def _terminated(self, signum: int, frame: Any) -> None:
        if self._runtime.get("checkpointing"):
            _log("SIGTERM during the checkpoint: the requeue is under way")
            return
        env: SlurmEnv | None = self._runtime.get("env")
        if env is not None and env.node_index == 0 and _requeued(env):
            _log("SIGTERM for a requeue: stopping this node's Ray and the driver; the requeued job continues")
            with contextlib.suppress(OSError, KeyError, TypeError):
                self._runtime["stop_file"].touch()
            # Slurm signals every process of the job at once, so the driver may fail on its dying Ray before it
            # sees the stop file: once it is gone, the sweep is recorded as waiting for its next run.
            _stop(self._runtime.get("driver"), "the driver", timeout=3)
            _record_requeue(self.sweep_dir, env)
        else:
            _log("SIGTERM (job cancelled, requeued or preempted): stopping this node's Ray and the driver")
        # Slurm sends SIGKILL KillWait seconds after SIGTERM (30 s by default, 5 s on the testbed): be quick
        if env is not None and env.node_index == 0:
            self._teardown_head(env, worker_wait_s=0, stop_timeout=3, leftover_grace=0.5)
        else:
            self._teardown_worker(stop_timeout=3, leftover_grace=0.5)
        sys.exit(128 + signal.SIGTERM)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on Slurm's warning signal (USR2), on task 0: stop the driver so that it saves
        the experiment, stop Ray, and return the callable to requeue (None without requeue: the job ends)."""
        import submitit

        rt = self._runtime
        rt["checkpointing"] = True  # submitit's `scontrol requeue` brings SIGTERM: let submitit finish then
        stop_file: Path | None = rt.get("stop_file")
        driver: subprocess.Popen[Any] | None = rt.get("driver")
        _log(f"Slurm's warning signal: stopping the driver for a {'requeue' if self.requeue else 'stop'}")
        if stop_file is not None:
            with contextlib.suppress(OSError):
                stop_file.touch()
        grace = max(10, self.signal_delay_s - _TEARDOWN_RESERVE_S)
        _stop(driver, "the driver", sig=DRIVER_STOP_SIGNAL, timeout=grace)
        if driver is not None:
            _log("driver stopped" + (f" (status {driver.returncode})" if driver.returncode is not None else ""))
        if rt.get("env") is not None:
            self._teardown_head(rt["env"], worker_wait_s=10)
        if not self.requeue:
            return None
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    # ---------------------------------------------------------------------------------------- node 0

    def _start_node(self, env: SlurmEnv, build: Callable[[NodePorts], list[str]], node_env: Mapping[str, str],
                    label: str) -> tuple[_RayNode, NodePorts]:
        last = ""
        for attempt in range(START_ATTEMPTS):
            ports = choose_ports(env.job_id, env.node_index, skip=attempt)
            cmd = build(ports)
            _log(f"starting {label}: {shlex.join(cmd)}")
            node = _RayNode(cmd, node_env, label)
            self._runtime["node"] = node
            if node.wait_started(self.start_timeout_s):
                return node, ports
            node.stop()
            last = f"`ray start` exited with status {node.proc.returncode}" if node.proc.returncode is not None \
                else f"Ray did not start within {self.start_timeout_s:.0f} s"
            _log(f"{label} did not start ({last}); trying the next port block")
        raise RuntimeError(f"could not start {label} in {START_ATTEMPTS} attempts: {last}")

    def _run_head(self, env: SlurmEnv) -> int:
        rdv = rendezvous_dir(self.sweep_dir, env.job_id, env.restart)
        rdv.parent.mkdir(parents=True, exist_ok=True)
        for old in rdv.parent.glob(f"ray-{env.job_id}-*"):  # earlier runs of this job (requeues)
            if old != rdv:
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(rdv, ignore_errors=True)
        rdv.mkdir(mode=0o700)
        token_path = rdv / "token"
        _write_private(token_path, secrets.token_hex(32))
        temp_dir = ray_temp_dir(env.job_id, env.restart, 0)
        shutil.rmtree(temp_dir, ignore_errors=True)
        memory, store = node_memory(env.mem_per_node_mb)
        node_ip = _node_ip(env.node_name)
        self._runtime.update(env=env, rdv=rdv, temp_dir=temp_dir, stop_file=rdv / "stop")

        def build(ports: NodePorts) -> list[str]:
            return ray_head_command(python=sys.executable, ports=ports, num_cpus=env.cpus,
                                    num_gpus=self.gpus_per_node, temp_dir=temp_dir, node_ip=node_ip,
                                    memory_bytes=memory, object_store_bytes=store,
                                    include_dashboard=self.include_dashboard, dashboard_host=node_ip or "127.0.0.1")

        try:
            node, ports = self._start_node(env, build, ray_node_env(token_path), "ray head")
            # Ray writes the address it advertises just after saying it started
            address = _wait_for_value(lambda: _read_address(temp_dir), 10) or f"{node_ip or env.node_name}:{ports.gcs}"
            write_json_atomic(rdv / "head.json", {"address": address, "node": env.node_name,
                                                   "ports": asdict(ports), "job_id": env.job_id,
                                                   "restart": env.restart})
            _log(f"Ray head up at {address}; waiting for {env.num_nodes - 1} more node(s)")
            _wait_for(f"{env.num_nodes - 1} Ray worker node(s) to join",
                      lambda: len(list(rdv.glob("node-*.ready"))) >= env.num_nodes - 1,
                      self.start_timeout_s, alive=lambda: node.proc.poll() is None)
            command = self.command or driver_command(sys.executable, self.sweep_dir)
            extra = driver_env(ray_address=address, token_path=token_path, job_id=env.job_id, restart=env.restart,
                               num_nodes=env.num_nodes, stop_file=rdv / "stop",
                               dashboard=dashboard_url(node_ip, ports) if self.include_dashboard else None)
            _log(f"all {env.num_nodes} node(s) up; running the driver: {shlex.join(command)}"
                 + (f" (output: {self.driver_log})" if self.driver_log else ""))
            driver = self._start_driver(command, extra)
            self._runtime["driver"] = driver
            while driver.poll() is None:  # not wait(): the USR2 handler must be able to wait for it too
                if node.proc.poll() is not None:
                    _log("the Ray head exited while the driver was running; stopping the driver")
                    _stop(driver, "the driver")
                    raise RuntimeError(f"the Ray head exited (status {node.proc.returncode})")
                time.sleep(0.5)
            returncode = driver.returncode
            _log(f"driver exited with status {returncode}")
        finally:
            self._teardown_head(env)
        if returncode != 0:
            raise DriverFailed(returncode, command)
        return returncode

    def _start_driver(self, command: Sequence[str], extra: Mapping[str, str]) -> subprocess.Popen[Any]:
        if self.driver_log is None:
            return _spawn(command, extra)
        log_path = Path(self.driver_log)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as out:  # the child keeps its own descriptor
            out.write(f"[ckd-launcher {time.strftime('%Y-%m-%d %H:%M:%S')}] Slurm job "
                      f"{extra['CKD_SLURM_JOB_ID']} run {extra['CKD_SLURM_RESTART']}: starting the driver\n")
            out.flush()
            return _spawn(command, extra, stdout=out, stderr=subprocess.STDOUT)

    def _teardown_head(self, env: SlurmEnv, worker_wait_s: float = 30.0, stop_timeout: float = 30.0,
                       leftover_grace: float = 5.0) -> None:
        """Tell the workers the driver is done, stop the driver (if still running) and this node's Ray, wait a
        little for the workers to stop theirs, remove the temp dir and the rendezvous directory (token)."""
        rt = self._runtime
        if rt.get("torn_down"):
            return
        rt["torn_down"] = True
        rdv: Path | None = rt.get("rdv")
        if rdv is not None and rdv.is_dir():
            with contextlib.suppress(OSError):
                (rdv / "done").touch()
        _stop(rt.get("driver"), "the driver", timeout=stop_timeout)
        node: _RayNode | None = rt.get("node")
        if node is not None:
            node.stop(stop_timeout)
        _kill_descendants(leftover_grace)
        if rdv is not None and rdv.is_dir() and env.num_nodes > 1 and worker_wait_s > 0:
            with contextlib.suppress(TimeoutError, OSError):  # workers read the token until they stop
                _wait_for("worker nodes to stop", lambda: len(list(rdv.glob("node-*.stopped"))) >= env.num_nodes - 1,
                          worker_wait_s)
        if rt.get("temp_dir"):
            shutil.rmtree(rt["temp_dir"], ignore_errors=True)
        if rdv is not None:
            shutil.rmtree(rdv, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- nodes 1..

    def _run_worker(self, env: SlurmEnv) -> int:
        rdv = rendezvous_dir(self.sweep_dir, env.job_id, env.restart)
        self._runtime["rdv"] = rdv
        head = _wait_for(f"the Ray head's address in {rdv}/head.json", lambda: _read_json(rdv / "head.json"),
                         self.start_timeout_s, interval=1.0)
        token_path = rdv / "token"
        temp_dir = ray_temp_dir(env.job_id, env.restart, env.node_index)
        shutil.rmtree(temp_dir, ignore_errors=True)
        self._runtime["temp_dir"] = temp_dir
        memory, store = node_memory(env.mem_per_node_mb)
        node_ip = _node_ip(env.node_name)

        def build(ports: NodePorts) -> list[str]:
            return ray_worker_command(python=sys.executable, head_address=head["address"], ports=ports,
                                      num_cpus=env.cpus, num_gpus=self.gpus_per_node, temp_dir=temp_dir,
                                      node_ip=node_ip, memory_bytes=memory, object_store_bytes=store)

        label = f"ray worker {env.node_index}"
        try:
            node, _ = self._start_node(env, build, ray_node_env(token_path), label)
            (rdv / f"node-{env.node_index}.ready").touch()
            _log(f"{label} joined {head['address']}; running until the driver is done")
            while not (rdv / "done").exists():
                if node.proc.poll() is not None:
                    raise RuntimeError(f"{label} exited (status {node.proc.returncode}) before the driver was done")
                time.sleep(1.0)
            _log("the driver is done; stopping this node")
        finally:
            self._teardown_worker()
        return 0

    def _teardown_worker(self, stop_timeout: float = 30.0, leftover_grace: float = 5.0) -> None:
        rt = self._runtime
        if rt.get("torn_down"):
            return
        rt["torn_down"] = True
        node: _RayNode | None = rt.get("node")
        if node is not None:
            node.stop(stop_timeout)
        _kill_descendants(leftover_grace)
        if rt.get("rdv") is not None and rt.get("env") is not None:
            with contextlib.suppress(OSError):
                (rt["rdv"] / f"node-{rt['env'].node_index}.stopped").touch()
        if rt.get("temp_dir"):
            shutil.rmtree(rt["temp_dir"], ignore_errors=True)


def _record_requeue(sweep_dir: str, env: SlurmEnv) -> None:
    """Mark the sweep in `<sweep_dir>/state.json` as pending (waiting for the requeued run), without the error
    its interrupted driver may have recorded."""
    if not Path(sweep_dir, "state.json").is_file():
        return
    from orchestrator.state import SweepDir

    try:
        SweepDir(sweep_dir).update_state(status="pending", error=None, requeued_from_run=env.restart)
    except (OSError, ValueError) as err:
        _log(f"could not record the requeue in {sweep_dir}/state.json: {err}")


def _requeued(env: SlurmEnv, timeout: float = 2.0) -> bool:
    """Whether Slurm is requeueing this job (`scontrol requeue`, a preemption with requeue): its restart count
    is already ahead of this run's when the SIGTERM arrives; a `scancel` leaves it as it is."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", str(env.job_id)], capture_output=True, text=True,
                             timeout=timeout, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    for field in out.split():
        if field.startswith("Restarts="):
            return field.removeprefix("Restarts=").isdigit() and int(field.removeprefix("Restarts=")) > env.restart
    return False


def _wait_for_value(read: Callable[[], Any], timeout: float) -> Any:
    end = time.monotonic() + timeout
    while not (value := read()) and time.monotonic() < end:
        time.sleep(0.2)
    return value


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_address(temp_dir: str) -> str | None:
    """The GCS address Ray wrote into its temp dir (Ray replaces a loopback node IP by the machine's)."""
    try:
        return Path(temp_dir, "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


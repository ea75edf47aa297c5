"""What runs inside a Slurm allocation: a Ray cluster over its nodes, then the sweep driver on the head.

submitit starts one task per node (`srun`, tasks_per_node=1), each calling the pickled `RayAllocation`:

- task 0 (node 0) writes a fresh Ray token into a 0600 file in the sweep directory, starts the Ray head
  (`ray start --head --block`) on ports chosen for this allocation, publishes its address, waits until every
  other node has joined, then runs the driver's command line (the `DriverLaunch`'s argv and environment,
  under this task's interpreter) with RAY_ADDRESS set, and finally stops the Ray processes it started (its
  own `ray start --block`, which takes its raylet, GCS and workers with it; never a machine-wide `ray stop`);
- every other task waits for the head's address, starts a Ray worker node joined to it, and stops it when
  the head says the driver is done.

Rendezvous goes through `<sweep_dir>/slurm/ray-<job id>-<restart>/` (the sweep directory is on the shared
file system anyway): `token` (0600, in a 0700 directory), `head.json`, `node-<i>.ready`, `node-<i>.stopped`,
`done`, `stop`. The token never appears on a command line; Ray processes and the driver read it through
RAY_AUTH_TOKEN_PATH (with RAY_AUTH_MODE=token).

Ports: each node takes a block of PORT_BLOCK consecutive ports in [PORT_RANGE_START, PORT_RANGE_END) (below
Linux's ephemeral range, above Ray's default worker ports), the first block chosen from the job id and node
index and checked free, the next free block otherwise; two users' allocations on one node (and the testbed's
emulated nodes, which share a host) get different blocks. Temp dirs are short (`/tmp/ckd-<uid>/r<random>`,
made by mkdtemp, 0700, under the user's own 0700 base; Ray's Unix sockets live there) and removed at the end.

Walltime and preemption: submitit installs a USR2 handler (the sbatch script has `--signal=USR2@<delay>`);
on task 0 it calls `RayAllocation.checkpoint`, which creates the `stop` file (its path is CKD_STOP_FILE in
the driver's environment), sends the driver SIGINT (Ray Tune saves the experiment and returns from fit),
waits for it, stops Ray, leaves the requeue marker (below) and hands submitit the same callable to requeue
(`scontrol requeue`). The requeued
job (same job id, SLURM_RESTART_COUNT + 1) starts everything again and the driver restores the experiment
(Tuner.restore). Children are started with USR2 ignored, so Slurm's signal reaches only the launcher.
`scontrol requeue` (or a node failure) sends SIGTERM instead: Ray shuts down, the driver is killed, and the
requeued job restores from the last saved experiment state. On such a SIGTERM, task 0 asks Slurm whether the
job is being requeued (its restart count is then already ahead); if so it creates the stop file and, once the
driver is gone, writes the job's requeue marker (`<sweep_dir>/slurm/requeued-<job>.json`), from which
`SlurmBackend.status` reports the job as requeued, so that the orchestrator records the sweep as pending
(waiting for the next run) rather than cancelled. The next run's node 0 removes the marker.

The driver's output goes to the sweep's logs/driver.log (appended by every run), which `ckd-orchestrate logs`
reads; the launcher's and Ray's own output stays in submitit's per-task logs.

The per-node command lines are pure functions in cluster.slurm.commands (so that `plan` prints them and tests
check them); the process handling (spawn with USR2 ignored, stop, subreaper, leftovers) is
cluster.slurm.processes. This module is the per-node lifecycle: `SlurmEnv`, `RayAllocation`, the USR2 and
SIGTERM handlers.
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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cluster.slurm.commands import (
    NodePorts, choose_ports, dashboard_url, driver_env, node_memory, ray_head_command, ray_node_env, ray_temp_dir,
    ray_worker_command, rendezvous_dir, requeue_marker,
)  # fmt: skip
from cluster.slurm.processes import (
    RayNode, become_subreaper, kill_descendants, log, spawn, stop, wait_for, write_private,
)  # fmt: skip
from jobs.storage import write_json_atomic

__all__ = ["DriverFailed", "RayAllocation", "SlurmEnv"]

START_ATTEMPTS = 3  # port blocks tried when `ray start` fails (another process took a port meanwhile)
# The stop signal for the driver: Ray Tune catches SIGINT, saves the experiment state and returns from fit().
DRIVER_STOP_SIGNAL = signal.SIGINT
# Seconds kept back from signal_delay_s for stopping Ray and requeueing after the driver has stopped.
_TEARDOWN_RESERVE_S = 30


class DriverFailed(RuntimeError):
    """The driver command exited with a non-zero status (the Slurm job then fails)."""

    def __init__(self, returncode: int, command: Sequence[str]) -> None:
        self.returncode = returncode
        super().__init__(f"the driver exited with status {returncode}: {shlex.join(command)}")



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


# ------------------------------------------------------------------------------------------ the callable


class RayAllocation:
    """The callable submitit runs once per node (one task per node); see the module docstring.

    Args:
        sweep_dir: the sweep directory (on a file system every node sees).
        command: the driver's command line (the `DriverLaunch`'s argv, interpreter first), run on node 0 once
            every node has joined. Its first item is replaced by the interpreter running this task: the grid's
            `python` may be a shell command (`apptainer exec ckd.sif python`) that started this very process.
        env: variables added to the driver's environment (the `DriverLaunch`'s; the allocation's Ray
            variables from `driver_env` take precedence).
        gpus_per_node: Ray's --num-gpus on each node (CPUs come from SLURM_CPUS_PER_TASK).
        include_dashboard: start the Ray dashboard on the head.
        requeue: on Slurm's warning signal, checkpoint and requeue (else stop the driver and end).
        signal_delay_s: how long before the time limit the warning comes (bounds the driver's grace time).
        start_timeout_s: how long a node waits for Ray to start, for the head's address, or for all nodes.
        driver_log: a file the driver's stdout and stderr are appended to (the sweep's logs/driver.log, which
            `ckd-orchestrate logs` reads on the shared file system); None: this task's own output.
    """

    def __init__(self, sweep_dir: str | Path, command: Sequence[str], *, env: Mapping[str, str] | None = None,
                 gpus_per_node: int = 0, include_dashboard: bool = False, requeue: bool = True,
                 signal_delay_s: int = 120, start_timeout_s: float = 600.0,
                 driver_log: str | Path | None = None) -> None:
        if not command:
            raise ValueError("RayAllocation needs the driver's command line (interpreter first)")
        self.sweep_dir = str(Path(sweep_dir).resolve())
        self.command = list(command)
        self.env = dict(env or {})
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
        log(f"job {env.job_id} restart {env.restart}: node {env.node_index}/{env.num_nodes} ({env.node_name}), "
             f"{env.cpus} CPUs, {self.gpus_per_node} GPUs, memory {env.mem_per_node_mb} MB")
        # scancel, `scontrol requeue`, preemption and the time limit itself send SIGTERM to every process of the
        # job (then SIGKILL after KillWait): clean up quickly (submitit itself would ignore it).
        signal.signal(signal.SIGTERM, self._terminated)
        become_subreaper()
        if env.node_index == 0:
            return self._run_head(env)
        return self._run_worker(env)

    def _terminated(self, signum: int, frame: Any) -> None:
        if self._runtime.get("checkpointing"):
            log("SIGTERM during the checkpoint: the requeue is under way")
            return
        env: SlurmEnv | None = self._runtime.get("env")
        if env is not None and env.node_index == 0 and _requeued(env):
            log("SIGTERM for a requeue: stopping this node's Ray and the driver; the requeued job continues")
            with contextlib.suppress(OSError, KeyError, TypeError):
                self._runtime["stop_file"].touch()
            # Slurm signals every process of the job at once, so the driver may fail on its dying Ray before it
            # sees the stop file: once it is gone, the requeue marker says that the sweep waits for its next run.
            stop(self._runtime.get("driver"), "the driver", timeout=3)
            _mark_requeued(self.sweep_dir, env)
        else:
            log("SIGTERM (job cancelled, requeued or preempted): stopping this node's Ray and the driver")
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
        log(f"Slurm's warning signal: stopping the driver for a {'requeue' if self.requeue else 'stop'}")
        if stop_file is not None:
            with contextlib.suppress(OSError):
                stop_file.touch()
        grace = max(10, self.signal_delay_s - _TEARDOWN_RESERVE_S)
        stop(driver, "the driver", sig=DRIVER_STOP_SIGNAL, timeout=grace)
        if driver is not None:
            log("driver stopped" + (f" (status {driver.returncode})" if driver.returncode is not None else ""))
        if rt.get("env") is not None:
            self._teardown_head(rt["env"], worker_wait_s=10)
        if not self.requeue:
            return None
        if rt.get("env") is not None:
            _mark_requeued(self.sweep_dir, rt["env"])
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    # ---------------------------------------------------------------------------------------- node 0

    def _start_node(self, env: SlurmEnv, build: Callable[[NodePorts], list[str]], node_env: Mapping[str, str],
                    label: str) -> tuple[RayNode, NodePorts]:
        last = ""
        for attempt in range(START_ATTEMPTS):
            ports = choose_ports(env.job_id, env.node_index, skip=attempt)
            cmd = build(ports)
            log(f"starting {label}: {shlex.join(cmd)}")
            node = RayNode(cmd, node_env, label)
            self._runtime["node"] = node
            if node.wait_started(self.start_timeout_s):
                return node, ports
            node.stop()
            last = f"`ray start` exited with status {node.proc.returncode}" if node.proc.returncode is not None \
                else f"Ray did not start within {self.start_timeout_s:.0f} s"
            log(f"{label} did not start ({last}); trying the next port block")
        raise RuntimeError(f"could not start {label} in {START_ATTEMPTS} attempts: {last}")

    def _run_head(self, env: SlurmEnv) -> int:
        rdv = rendezvous_dir(self.sweep_dir, env.job_id, env.restart)
        rdv.parent.mkdir(parents=True, exist_ok=True)
        # this run is the one a requeue waited for
        requeue_marker(self.sweep_dir, env.job_id).unlink(missing_ok=True)
        for old in rdv.parent.glob(f"ray-{env.job_id}-*"):  # earlier runs of this job (requeues)
            if old != rdv:
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(rdv, ignore_errors=True)
        rdv.mkdir(mode=0o700)
        token_path = rdv / "token"
        write_private(token_path, secrets.token_hex(32))
        temp_dir = ray_temp_dir()  # private and unpredictable (not a name another user could claim first)
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
            log(f"Ray head up at {address}; waiting for {env.num_nodes - 1} more node(s)")
            wait_for(f"{env.num_nodes - 1} Ray worker node(s) to join",
                     lambda: len(list(rdv.glob("node-*.ready"))) >= env.num_nodes - 1,
                     self.start_timeout_s, alive=lambda: node.proc.poll() is None)
            command = [sys.executable, *self.command[1:]]  # the interpreter `python` started (see Args)
            ray_env = driver_env(ray_address=address, token_path=token_path, job_id=env.job_id, restart=env.restart,
                                 num_nodes=env.num_nodes, stop_file=rdv / "stop",
                                 dashboard=dashboard_url(node_ip, ports) if self.include_dashboard else None)
            extra = {**self.env, **ray_env}  # the allocation's Ray cluster, never one named in the launch
            log(f"all {env.num_nodes} node(s) up; running the driver: {shlex.join(command)}"
                 + (f" (output: {self.driver_log})" if self.driver_log else ""))
            driver = self._start_driver(command, extra)
            self._runtime["driver"] = driver
            while driver.poll() is None:  # not wait(): the USR2 handler must be able to wait for it too
                if node.proc.poll() is not None:
                    log("the Ray head exited while the driver was running; stopping the driver")
                    stop(driver, "the driver")
                    raise RuntimeError(f"the Ray head exited (status {node.proc.returncode})")
                time.sleep(0.5)
            returncode = driver.returncode
            log(f"driver exited with status {returncode}")
        finally:
            self._teardown_head(env)
        if returncode != 0:
            raise DriverFailed(returncode, command)
        return returncode

    def _start_driver(self, command: Sequence[str], extra: Mapping[str, str]) -> subprocess.Popen[Any]:
        if self.driver_log is None:
            return spawn(command, extra)
        log_path = Path(self.driver_log)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as out:  # the child keeps its own descriptor
            out.write(f"[ckd-launcher {time.strftime('%Y-%m-%d %H:%M:%S')}] Slurm job "
                      f"{extra['CKD_SLURM_JOB_ID']} run {extra['CKD_SLURM_RESTART']}: starting the driver\n")
            out.flush()
            return spawn(command, extra, stdout=out, stderr=subprocess.STDOUT)

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
        stop(rt.get("driver"), "the driver", timeout=stop_timeout)
        node: RayNode | None = rt.get("node")
        if node is not None:
            node.stop(stop_timeout)
        kill_descendants(leftover_grace)
        if rdv is not None and rdv.is_dir() and env.num_nodes > 1 and worker_wait_s > 0:
            with contextlib.suppress(TimeoutError, OSError):  # workers read the token until they stop
                wait_for("worker nodes to stop", lambda: len(list(rdv.glob("node-*.stopped"))) >= env.num_nodes - 1,
                         worker_wait_s)
        if rt.get("temp_dir"):
            shutil.rmtree(rt["temp_dir"], ignore_errors=True)
        if rdv is not None:
            shutil.rmtree(rdv, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- nodes 1..

    def _run_worker(self, env: SlurmEnv) -> int:
        rdv = rendezvous_dir(self.sweep_dir, env.job_id, env.restart)
        self._runtime["rdv"] = rdv
        head = wait_for(f"the Ray head's address in {rdv}/head.json", lambda: _read_json(rdv / "head.json"),
                        self.start_timeout_s, interval=1.0)
        token_path = rdv / "token"
        temp_dir = ray_temp_dir()
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
            log(f"{label} joined {head['address']}; running until the driver is done")
            while not (rdv / "done").exists():
                if node.proc.poll() is not None:
                    raise RuntimeError(f"{label} exited (status {node.proc.returncode}) before the driver was done")
                time.sleep(1.0)
            log("the driver is done; stopping this node")
        finally:
            self._teardown_worker()
        return 0

    def _teardown_worker(self, stop_timeout: float = 30.0, leftover_grace: float = 5.0) -> None:
        rt = self._runtime
        if rt.get("torn_down"):
            return
        rt["torn_down"] = True
        node: RayNode | None = rt.get("node")
        if node is not None:
            node.stop(stop_timeout)
        kill_descendants(leftover_grace)
        if rt.get("rdv") is not None and rt.get("env") is not None:
            with contextlib.suppress(OSError):
                (rt["rdv"] / f"node-{rt['env'].node_index}.stopped").touch()
        if rt.get("temp_dir"):
            shutil.rmtree(rt["temp_dir"], ignore_errors=True)


def _mark_requeued(sweep_dir: str, env: SlurmEnv) -> None:
    """Write the job's requeue marker (see `requeue_marker`): the sweep waits for the requeued run, whatever
    its interrupted driver may have recorded. The orchestrator, not this compute node, updates the sweep's
    state from it (through `SlurmBackend.status`)."""
    marker = requeue_marker(sweep_dir, env.job_id)
    try:
        write_json_atomic(marker, {"job_id": str(env.job_id), "requeued_from_run": env.restart,
                                   "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except OSError as err:
        log(f"could not write the requeue marker {marker}: {err}")


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


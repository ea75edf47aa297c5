"""Slurm backend: the `cluster:` model, the sbatch script and per-node command lines we generate, and, on a
REAL Slurm (cluster/slurm/testbed.sh: slurmctld, two emulated slurmd nodes, slurmdbd + MariaDB), a sweep job
submitted through `SlurmBackend` whose driver is a small Ray script.

The real-Slurm tests start the testbed in a session fixture; they are skipped only when it cannot be started
(not root, no apt, ...; the reason is printed), and fail instead when CKD_REQUIRE_SLURM=1 (CI).

Slurm gives a requeued job a begin time about two minutes ahead; the tests release it at once with
`scontrol update JobId=... StartTime=now` (root), so the requeue is seen in seconds.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from slurmkit import processes_with as _processes_with
from slurmkit import sacct_state as _sacct_state
from slurmkit import slurm  # noqa: F401  (the session fixture)
from slurmkit import wait_until as _wait

from cluster.base import DriverLaunch, JobStatus, SweepStatus, TrialShape
from cluster.slurm import ClusterSpecError, SlurmClusterSpec, parse_slurm_time
from cluster.slurm import launcher as launcher_module
from cluster.slurm import processes
from cluster.slurm.backend import (
    SlurmBackend, SlurmJobStatus, SlurmUnavailableError, describe_job, executor_parameters, sweep_state,
)  # fmt: skip
from cluster.slurm.commands import (
    PORT_BLOCK, PORT_RANGE_END, PORT_RANGE_START, NodePorts, allocation_plan, choose_ports, dashboard_url, driver_env,
    node_memory, port_block_order, ray_head_command, ray_node_env, ray_temp_dir, ray_worker_command, rendezvous_dir,
    requeue_marker,
)  # fmt: skip
from cluster.slurm.config import OWNED_SBATCH_OPTIONS, normalize_sbatch_key
from cluster.slurm.launcher import RayAllocation, SlurmEnv


def spec(**fields: Any) -> SlurmClusterSpec:
    return SlurmClusterSpec.from_mapping({"time": "1:00:00", **fields})


def launch(sweep_dir: Path | str, argv: list[str] | None = None, python: str = sys.executable) -> DriverLaunch:
    """The launch orchestrator.launch builds for a Slurm sweep (default: the sweep driver)."""
    argv = argv or [python, "-m", "orchestrator.driver", str(sweep_dir)]
    return DriverLaunch(sweep_id=Path(sweep_dir).name, sweep_dir=str(sweep_dir), local_dir=str(sweep_dir),
                        argv=tuple(argv), env={"CKD_TEST_LAUNCH_ENV": "1"})


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ClusterSpecError) as info:
        SlurmClusterSpec.from_mapping(data)
    return dict(info.value.issues)


# ================================================================================================ config


def test_minimal_spec_defaults():
    s = SlurmClusterSpec.from_mapping({"backend": "slurm", "time": "4:00:00"})
    assert (s.nodes, s.cpus_per_task, s.gpus_per_node, s.signal_delay_s, s.requeue, s.max_timeouts) == (
        1, 2, 0, 120, True, 3)
    assert s.python is None and s.mem is None and s.setup == [] and s.sbatch_extra == {}
    assert s.ray_dashboard  # Ray Train releases early-stopped trials' workers through the dashboard's State API
    assert s.timeout_min == 240 and s.time_seconds == 4 * 3600
    assert SlurmClusterSpec.from_mapping(s.model_dump(mode="json")) == s  # round trip (sweep.json)


@pytest.mark.parametrize("value, seconds", [
    (90, 5400), ("90", 5400), ("30:00", 1800), ("1:30", 90), ("4:00:00", 14400), ("100:00:00", 360000),
    ("2-00:00:00", 172800), ("1-2", 93600), ("1-2:30", 95400), ("1-02:30:15", 95415), (" 45 ", 2700),
])  # fmt: skip
def test_slurm_time_formats(value, seconds):
    assert parse_slurm_time(value) == seconds


def test_time_rounds_seconds_up_to_minutes():
    assert spec(time="3:30", signal_delay_s=30).timeout_min == 4


@pytest.mark.parametrize("value, fragment", [
    (0, "positive"), (-5, "positive"), ("0", "positive"), ("0:00:00", "positive"), ("1:60", "seconds must be < 60"),
    ("1:60:00", "minutes and seconds must be < 60"), ("1-24", "hours must be < 24"), ("1h", "not a Slurm time"),
    ("1:2:3:4", "not a Slurm time"), ("", "not a Slurm time"), ("UNLIMITED", "finite"), ("infinite", "finite"),
    (True, "expected a Slurm time limit"), (1.5, "expected a Slurm time limit"),
])  # fmt: skip
def test_bad_time_is_reported_at_time(value, fragment):
    found = problems({"time": value})
    assert fragment in found["time"], found


@pytest.mark.parametrize("fields, key, fragment", [
    ({}, "time", "required key is missing"),
    ({"backend": "slurmm"}, "backend", "'slurm'"),
    ({"nodes": 0}, "nodes", "greater than or equal to 1"),
    ({"cpus_per_task": 0}, "cpus_per_task", "greater than or equal to 1"),
    ({"gpus_per_node": -1}, "gpus_per_node", "greater than or equal to 0"),
    ({"partition": "gpu long"}, "partition", "without spaces"),
    ({"account": ""}, "account", "non-empty"),
    ({"mem": "16GiB"}, "mem", "sbatch --mem"),
    ({"mem": "1.5G"}, "mem", "sbatch --mem"),
    ({"mem": True}, "mem", "sbatch --mem"),
    ({"setup": ["module load cuda", "a\nb"]}, "setup[1]", "one line"),
    ({"setup": ["  "]}, "setup[0]", "must not be empty"),
    ({"python": ""}, "python", "must not be empty"),
    ({"signal_delay_s": 0}, "signal_delay_s", "greater than or equal to 1"),
    ({"signal_delay_s": 70000}, "signal_delay_s", "less than or equal to 65535"),
    ({"time": 2, "signal_delay_s": 90}, "signal_delay_s", "raise time or lower signal_delay_s"),
    ({"max_timeouts": -1}, "max_timeouts", "greater than or equal to 0"),
    ({"sbatch_extra": {"mail-type": "END", "partition": "x"}}, "sbatch_extra.partition", "set partition"),
    ({"sbatch_extra": {"--time": "1:00"}}, "sbatch_extra.--time", "set time"),
    ({"sbatch_extra": {"p": "gpu"}}, "sbatch_extra.p", "sbatch --partition is set by ckd-orchestrate"),
    ({"sbatch_extra": {"-N": 2}}, "sbatch_extra.-N", "set nodes"),
    ({"sbatch_extra": {"ntasks_per_node": 4}}, "sbatch_extra.ntasks_per_node", "one task per node"),
    ({"sbatch_extra": {"signal": "B:USR1@60"}}, "sbatch_extra.signal", "set signal_delay_s"),
    ({"sbatch_extra": {"no-requeue": True}}, "sbatch_extra.no-requeue", "set requeue"),
    ({"sbatch_extra": {"output": "/tmp/x"}}, "sbatch_extra.output", "<sweep>/slurm"),
    ({"sbatch_extra": {"gpus": 2}}, "sbatch_extra.gpus", "set gpus_per_node"),
    ({"sbatch_extra": {"mail user": "x"}}, "sbatch_extra.mail user", "long option name"),
    ({"sbatch_extra": {"mail_type": "END", "mail-type": "FAIL"}}, "sbatch_extra.mail-type", "same sbatch option"),
    ({"sbatch_extra": {"exclusive": False}}, "sbatch_extra.exclusive", "leave the option out"),
    ({"sbatch_extra": {"comment": "a\nb"}}, "sbatch_extra.comment", "one line"),
    ({"sbatch_extra": {"comment": None}}, "sbatch_extra.comment", "a string, a number or true"),
    ({"sbatch_extra": {"comment": ["a"]}}, "sbatch_extra.comment", "a string, a number or true"),
    ({"mem": "16G", "sbatch_extra": {"mem-per-cpu": "4G"}}, "sbatch_extra.mem-per-cpu", "one of --mem"),
    ({"walltime": "1:00:00"}, "walltime", "unknown key"),
])  # fmt: skip
def test_errors_carry_their_key(fields, key, fragment):
    data = {"time": "1:00:00", **fields} if "time" not in fields and fields != {} else dict(fields)
    found = problems(data)
    assert key in found, found
    assert fragment in found[key], found[key]


def test_unknown_key_lists_the_valid_ones():
    message = problems({"time": 60, "gpu_per_node": 1})["gpu_per_node"]
    assert "did you mean 'gpus_per_node'" in message and "sbatch_extra" in message and "signal_delay_s" in message


def test_every_problem_at_once():
    found = problems({"nodes": 0, "mem": "x", "partition": "a b", "sbatch_extra": {"J": "name"}, "bogus": 1})
    assert {"time", "nodes", "mem", "partition", "sbatch_extra.J", "bogus"} <= set(found), found


def test_every_owned_sbatch_option_is_refused():
    for name in OWNED_SBATCH_OPTIONS:
        assert name in problems({"time": 60, "sbatch_extra": {name: "x"}}).get(f"sbatch_extra.{name}", ""), name


def test_sbatch_keys_are_normalized():
    assert normalize_sbatch_key("--mail_user") == "mail-user"
    assert normalize_sbatch_key("p") == "partition" and normalize_sbatch_key("-J") == "job-name"
    assert spec(sbatch_extra={"mail_user": "a@b", "--reservation": "r"}).sbatch_options() == {
        "mail-user": "a@b", "reservation": "r"}
    assert spec(sbatch_extra={"mem-per-cpu": "4G"}).sbatch_options() == {"mem-per-cpu": "4G"}  # no mem: allowed


def test_trial_fit():
    s = spec(nodes=2, cpus_per_task=4, gpus_per_node=1)
    assert (s.total_cpus, s.total_gpus) == (8, 2)
    assert s.trial_fit_problems(workers=2, cpus_per_worker=3, gpus_per_worker=1, driver_cpus=0.01) == []
    found = s.trial_fit_problems(workers=3, cpus_per_worker=5, gpus_per_worker=2, driver_cpus=0.01)
    assert len(found) == 4 and "cpus_per_task = 4" in found[0] and "gpus_per_node = 1" in found[1]


def test_grid_reports_slurm_keys_with_lines(tmp_path, glue_dir):
    from jobs.specbase import SpecError
    from orchestrator.grid import load_grid

    grid = textwrap.dedent(f"""\
        job:
          task: {{glue: rte, glue_dir: {glue_dir}, max_train_examples: 64}}
          teacher: {{source: "package:all-MiniLM-L6-v2"}}
          student: {{from_teacher: {{layers: [0, 5]}}}}
          objective: {{preset: ckd-paper}}
          training: {{epochs: 1, batch_size: 8}}
        sweep:
          space:
            training.seed: {{grid: [1, 2]}}
        cluster:
          backend: slurm
          time: "4:00:00"
          nodes: 2
          cpus_per_task: 4
        """)
    path = tmp_path / "grid.yaml"
    path.write_text(grid)
    loaded = load_grid(path)
    assert loaded.backend == "slurm" and isinstance(loaded.cluster, SlurmClusterSpec)
    assert loaded.cluster.nodes == 2 and loaded.to_dict()["cluster"]["backend"] == "slurm"
    bad = grid.replace("  nodes: 2\n", "  nodes: 0\n  sbatch_extra: {p: gpu}\n  mem: 16GiB\n")
    path.write_text(bad)
    with pytest.raises(SpecError) as info:
        load_grid(path)
    issues = {i.key: i for i in info.value.issues}
    assert {"cluster.nodes", "cluster.sbatch_extra.p", "cluster.mem"} <= set(issues), str(info.value)
    assert issues["cluster.nodes"].line == 13 and issues["cluster.mem"].line == 15

    # `plan` shows the sbatch script and what each node runs in the allocation, and submits nothing
    path.write_text(grid)
    from jobkit import cli

    shown = cli("plan", str(path), check=False, env={"CKD_CACHE_DIR": str(tmp_path / "cache")})
    assert "#SBATCH --nodes=2" in shown.stdout and "--cpus-per-task=4" in shown.stdout, shown.stdout + shown.stderr
    assert "(Ray head)" in shown.stdout and "nodes 1..1 (Ray workers" in shown.stdout
    assert "-m orchestrator.driver" in shown.stdout and not (tmp_path / "sweeps").exists()


# ========================================================================================= sbatch script


def test_executor_parameters_map_every_field(tmp_path):
    s = spec(time="1-00:00:00", partition="gpu", account="lab", qos="high", nodes=2, cpus_per_task=8,
             gpus_per_node=4, mem="64G", constraint="a100", exclude="n[1-2]", setup=["module load cuda"],
             sbatch_extra={"mail_type": "END"}, signal_delay_s=300, job_name="distill")
    assert executor_parameters(s, tmp_path / "sweep-1") == {
        "job_name": "distill", "time": 1440, "nodes": 2, "ntasks_per_node": 1, "cpus_per_task": 8,
        "gpus_per_node": 4, "partition": "gpu", "account": "lab", "qos": "high", "constraint": "a100",
        "exclude": "n[1-2]", "setup": ["module load cuda"], "signal_delay_s": 300,
        "additional_parameters": {"mem": "64G", "requeue": True, "mail-type": "END"},
    }
    minimal = executor_parameters(spec(requeue=False), tmp_path / "sweep-1")
    assert minimal["job_name"] == "ckd-sweep-1" and "gpus_per_node" not in minimal and "partition" not in minimal
    assert minimal["additional_parameters"] == {"no-requeue": True}


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_sbatch_script_golden(tmp_path):
    sweep = tmp_path / "sweeps" / "rte-20260101-abcd"
    s = spec(time="2-00:00:00", partition="gpu", account="lab", qos="high", nodes=2, cpus_per_task=8,
             gpus_per_node=4, mem="64G", constraint="a100", exclude="n[1-2]",
             setup=["module load cuda/12.4", "source ~/venvs/ckd/bin/activate"],
             sbatch_extra={"mail-type": "END", "exclusive": True}, signal_delay_s=180, python="/opt/ckd/bin/python")
    script = SlurmBackend(s).sbatch_script(sweep)
    folder = sweep.resolve() / "slurm"
    assert sbatch_lines(script) == [
        "#SBATCH --account=lab",
        "#SBATCH --constraint=a100",
        "#SBATCH --cpus-per-task=8",
        f"#SBATCH --error={folder}/%j_0_log.err",
        "#SBATCH --exclude='n[1-2]'",
        "#SBATCH --exclusive",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --job-name=ckd-rte-20260101-abcd",
        "#SBATCH --mail-type=END",
        "#SBATCH --mem=64G",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={folder}/%j_0_log.out",
        "#SBATCH --partition=gpu",
        "#SBATCH --qos=high",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@180",
        "#SBATCH --time=2880",
        "#SBATCH --wckey=submitit",
    ]
    body = script.split("# setup\n", 1)[1]
    assert body.splitlines()[:2] == ["module load cuda/12.4", "source ~/venvs/ckd/bin/activate"]
    srun = next(line for line in body.splitlines() if line.startswith("srun "))
    assert srun == (f"srun --unbuffered --output {folder}/%j_%t_log.out --error {folder}/%j_%t_log.err "
                    f"/opt/ckd/bin/python -u -m submitit.core._submit {folder}")
    assert body.index("source ~/venvs") < body.index("srun ")


def test_sbatch_script_defaults_use_this_interpreter(tmp_path):
    script = SlurmBackend(spec(time=30, requeue=False)).sbatch_script(tmp_path / "s")
    lines = sbatch_lines(script)
    assert "#SBATCH --no-requeue" in lines and "#SBATCH --time=30" in lines and "#SBATCH --signal=USR2@120" in lines
    assert not any(flag in script for flag in ("--gpus-per-node", "--partition", "--mem", "# setup"))
    assert f"{sys.executable} -u -m submitit.core._submit" in script


def test_plan_shows_node_commands_without_the_token(tmp_path):
    text = SlurmBackend(spec(nodes=3, cpus_per_task=6, gpus_per_node=2, mem="8G")).node_commands(launch(tmp_path / "s"))
    assert "--head --block" in text and "--num-cpus=6" in text and "--num-gpus=2" in text
    assert "nodes 1..2 (Ray workers" in text and "orchestrator.driver" in text
    assert f"RAY_AUTH_TOKEN_PATH={tmp_path.resolve() / 's' / 'slurm'}/ray-" in text.replace("'", "")
    assert "RAY_AUTH_TOKEN=" not in text
    head_ports = NodePorts(port_block_order(0, 0)[0])
    assert f"--dashboard-port={head_ports.dashboard}" in text  # on by default
    assert f"CKD_RAY_DASHBOARD_URL='http://<node 0 ip>:{head_ports.dashboard}'" in text
    memory, store = node_memory(8192)
    assert f"--memory={memory}" in text and f"--object-store-memory={store}" in text


# ===================================================================================== per-node commands


def test_head_command_line():
    ports = NodePorts(24000)
    cmd = ray_head_command(python="/venv/bin/python", ports=ports, num_cpus=16, num_gpus=4,
                           temp_dir="/tmp/ckd-77-0-0", node_ip="10.0.0.5", memory_bytes=1000, object_store_bytes=500)
    assert cmd[:5] == ["/venv/bin/python", "-m", "ray.scripts.scripts", "start", "--head"]
    for flag in ("--block", "--node-ip-address=10.0.0.5", "--port=24000", "--node-manager-port=24001",
                 "--object-manager-port=24002", "--ray-client-server-port=24003", "--dashboard-agent-listen-port=24005",
                 "--dashboard-agent-grpc-port=24006", "--metrics-export-port=24007", "--runtime-env-agent-port=24008",
                 "--min-worker-port=24020", "--max-worker-port=24199", "--num-cpus=16", "--num-gpus=4",
                 "--memory=1000", "--object-store-memory=500", "--include-dashboard=false",
                 "--temp-dir=/tmp/ckd-77-0-0", "--disable-usage-stats"):
        assert flag in cmd, flag
    with_dashboard = ray_head_command(python="p", ports=ports, num_cpus=1, num_gpus=0, temp_dir="/tmp/x",
                                      include_dashboard=True)
    assert "--include-dashboard=true" in with_dashboard and "--dashboard-port=24004" in with_dashboard
    assert "--dashboard-host=127.0.0.1" in with_dashboard
    on_cluster = ray_head_command(python="p", ports=ports, num_cpus=1, num_gpus=0, temp_dir="/tmp/x",
                                  include_dashboard=True, dashboard_host="10.0.0.5")
    assert "--dashboard-host=10.0.0.5" in on_cluster  # workers on other nodes call its State API
    assert dashboard_url("10.0.0.5", ports) == "http://10.0.0.5:24004" and dashboard_url(None, ports).startswith(
        "http://127.0.0.1:")
    assert not any(a.startswith("--node-ip-address") for a in with_dashboard)


def test_worker_command_line():
    cmd = ray_worker_command(python="py", head_address="10.0.0.5:24000", ports=NodePorts(26000), num_cpus=8,
                             num_gpus=0, temp_dir="/tmp/ckd-77-0-1", node_ip="10.0.0.6")
    assert cmd[:5] == ["py", "-m", "ray.scripts.scripts", "start", "--address=10.0.0.5:24000"]
    assert "--head" not in cmd and "--block" in cmd and "--num-cpus=8" in cmd and "--num-gpus=0" in cmd
    assert "--node-manager-port=26001" in cmd and "--min-worker-port=26020" in cmd
    assert not any(a.startswith(("--port=", "--include-dashboard", "--memory")) for a in cmd)


def test_token_is_passed_by_file_only(tmp_path):
    env = ray_node_env(tmp_path / "token")
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "token")
    assert "RAY_AUTH_TOKEN" not in env
    denv = driver_env(ray_address="h:1", token_path=tmp_path / "token", job_id=5, restart=2, num_nodes=3,
                      stop_file=tmp_path / "stop")
    assert denv["RAY_ADDRESS"] == "h:1" and denv["CKD_SLURM_RESTART"] == "2" and denv["CKD_RAY_NODES"] == "3"
    assert denv["CKD_STOP_FILE"] == str(tmp_path / "stop") and "RAY_AUTH_TOKEN" not in denv
    assert "CKD_RAY_DASHBOARD_URL" not in denv
    with_dashboard = driver_env(ray_address="h:1", token_path=tmp_path / "token", job_id=5, restart=0, num_nodes=1,
                                stop_file=tmp_path / "stop", dashboard="http://h:24004")
    assert with_dashboard["CKD_RAY_DASHBOARD_URL"] == "http://h:24004"


def test_port_blocks():
    first = port_block_order(12345, 0)
    assert len(first) == len(set(first)) == (PORT_RANGE_END - PORT_RANGE_START) // PORT_BLOCK
    assert all(PORT_RANGE_START <= b and b + PORT_BLOCK <= PORT_RANGE_END for b in first)
    assert PORT_RANGE_END <= 32768  # below Linux's ephemeral ports
    assert port_block_order(12345, 0) == first  # deterministic: every node computes the same
    assert port_block_order(12345, 1)[0] != first[0]  # two nodes of one allocation on one host
    assert len({port_block_order(j, 0)[0] for j in range(1000, 1040)}) > 30  # neighbouring job ids spread
    ports = NodePorts(first[0])
    assert len(ports.all()) == len(set(ports.all())) and max(ports.all()) < ports.base + PORT_BLOCK


def test_choose_ports_skips_busy_blocks():
    order = port_block_order(7, 0)
    busy = {order[0] + 3, order[1] + 150}  # one port of each of the first two blocks
    assert choose_ports(7, 0, is_free=lambda p: p not in busy).base == order[2]
    assert choose_ports(7, 0, skip=1, is_free=lambda p: True).base == order[1]
    with pytest.raises(RuntimeError, match="no free block"):
        choose_ports(7, 0, is_free=lambda p: False)


def test_choose_ports_sees_a_listening_socket():
    base = port_block_order(99, 0)[0]
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", base + 20))
        except OSError:
            pytest.skip(f"port {base + 20} is in use here already")
        sock.listen()
        assert choose_ports(99, 0).base != base


def test_temp_dirs_are_short_private_and_unpredictable(tmp_path):
    import shutil
    import stat

    made = [ray_temp_dir(), ray_temp_dir()]
    try:
        base = Path(f"/tmp/ckd-{os.getuid()}")
        for path in map(Path, made):
            assert path.parent == base and path.is_dir() and not path.is_symlink()
            info = path.stat()
            assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700
            assert len(str(path)) < 40  # + Ray's session_<date>_<pid>/sockets/plasma_store < 107
        assert made[0] != made[1]  # a random name: nobody can create it first
        assert base.stat().st_uid == os.getuid() and stat.S_IMODE(base.stat().st_mode) == 0o700
    finally:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
    # a base another user (here: a symlink, or a directory open to others that is not ours) could have claimed
    root = tmp_path / "root"
    root.mkdir()
    (root / f"ckd-{os.getuid()}").symlink_to(tmp_path)
    fallback = Path(ray_temp_dir(str(root)))
    assert fallback.parent == root and stat.S_IMODE(fallback.stat().st_mode) == 0o700
    assert rendezvous_dir("/s", 5, 1) == Path("/s/slurm/ray-5-1")


def test_slurm_env_is_read_once():
    env = SlurmEnv.from_environ({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2", "SLURM_NODEID": "1",
                                 "SLURM_JOB_NUM_NODES": "3", "SLURM_CPUS_PER_TASK": "12", "SLURM_MEM_PER_NODE": "4096",
                                 "SLURMD_NODENAME": "gpu07"})
    assert env == SlurmEnv(42, 2, 1, 3, 12, 4096, "gpu07")
    per_cpu = SlurmEnv.from_environ({"SLURM_JOB_ID": "1", "SLURM_CPUS_ON_NODE": "4", "SLURM_MEM_PER_CPU": "1024"})
    assert (per_cpu.restart, per_cpu.node_index, per_cpu.num_nodes, per_cpu.cpus, per_cpu.mem_per_node_mb) == (
        0, 0, 1, 4, 4096)


def test_node_memory():
    assert node_memory(None) == (None, None)
    memory, store = node_memory(10240)
    assert memory + store == 10240 * 1024 * 1024 and abs(store / (memory + store) - 0.3) < 0.01


def test_allocation_pickles_without_its_processes(tmp_path):
    import cloudpickle

    alloc = RayAllocation(tmp_path, ["python", "d.py"], env={"A": "1"}, gpus_per_node=2, signal_delay_s=90)
    alloc._runtime["driver"] = subprocess.Popen(["true"])
    copy = pickle.loads(cloudpickle.dumps(alloc))
    assert copy._runtime == {} and copy.command == ["python", "d.py"] and copy.gpus_per_node == 2
    assert copy.env == {"A": "1"}
    assert copy.sweep_dir == str(tmp_path.resolve())
    alloc._runtime["driver"].wait()


def test_checkpoint_requeues_only_with_requeue(tmp_path):
    import submitit

    delayed = RayAllocation(tmp_path, ["python", "d.py"]).checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and isinstance(delayed.function, RayAllocation)
    assert RayAllocation(tmp_path, ["python", "d.py"], requeue=False).checkpoint() is None
    with pytest.raises(ValueError, match="command line"):
        RayAllocation(tmp_path, [])


def test_checkpoint_stops_the_driver_with_sigint_after_the_stop_file(tmp_path):
    """The driver sees CKD_STOP_FILE before SIGINT (Ray Tune's graceful stop); checkpoint waits for it."""
    stop = tmp_path / "stop"
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""\
        import os, signal, sys, time
        def handler(signum, frame):
            open({str(tmp_path / 'seen')!r}, "w").write(str(os.path.exists({str(stop)!r})))
            sys.exit(0)
        signal.signal(signal.SIGINT, handler)
        open({str(tmp_path / 'ready')!r}, "w").close()
        time.sleep(60)
        """))
    alloc = RayAllocation(tmp_path, [sys.executable, str(script)], signal_delay_s=60)
    driver = processes.spawn([sys.executable, str(script)], {})
    alloc._runtime.update(driver=driver, stop_file=stop)
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(driver.pid, signal.SIGUSR2)  # ignored: Slurm's warning is for the launcher only
    time.sleep(0.3)
    assert driver.poll() is None
    assert alloc.checkpoint() is not None
    assert driver.poll() == 0 and (tmp_path / "seen").read_text() == "True"


def test_allocation_plan_runs_the_launch_argv():
    text = allocation_plan(sweep_dir="/s/x", driver_argv=["/py", "-m", "orchestrator.driver", "/s/x"], nodes=1,
                           cpus_per_task=2, gpus_per_node=0, python="/py")
    assert "/py -m orchestrator.driver /s/x" in text and "Ray workers" not in text


def test_plan_text_is_the_sbatch_script_and_the_node_commands(tmp_path):
    backend = SlurmBackend(spec(nodes=2, python="/opt/ckd/bin/python"))
    assert backend.interpreter() == "/opt/ckd/bin/python"
    the_launch = launch(tmp_path / "s", python=backend.interpreter())
    sections = backend.plan_text(the_launch)
    assert [title for title, _ in sections] == ["sbatch script", "what the nodes run inside the allocation"]
    assert sections[0][1] == backend.sbatch_script(tmp_path / "s")
    assert sections[1][1] == backend.node_commands(the_launch)
    assert f"/opt/ckd/bin/python -m orchestrator.driver {tmp_path / 's'}" in sections[1][1]
    assert SlurmBackend(spec()).interpreter() == sys.executable


def test_plan_problems_name_the_trial_that_cannot_fit(tmp_path):
    backend = SlurmBackend(spec(nodes=2, cpus_per_task=4, gpus_per_node=1))
    fits = TrialShape(workers=2, cpus_per_worker=3, gpus_per_worker=1, driver_cpus=0.01)
    assert backend.plan_problems(fits, launch(tmp_path)) == []
    found = backend.plan_problems(TrialShape(workers=3, cpus_per_worker=5, gpus_per_worker=2, driver_cpus=0.01),
                                  launch(tmp_path))
    assert len(found) == 4 and all(p.startswith("sweep.resources: ") for p in found)
    assert "cpus_per_task = 4" in found[0] and "gpus_per_node = 1" in found[1]


def _fake_squeue(monkeypatch, backend: SlurmBackend, slurm_state: str) -> None:
    monkeypatch.setattr(backend, "job_status", lambda job_id: SlurmJobStatus(str(job_id), slurm_state,
                                                                             source="squeue"))


def test_status_reports_a_requeue_from_the_launchers_marker(tmp_path, monkeypatch):
    """The launcher writes <sweep>/slurm/requeued-<job>.json when Slurm requeues the job; while the job waits,
    `status` says requeued (the orchestrator then records the sweep as pending); never a state.json write."""
    backend = SlurmBackend(spec())
    sweep = tmp_path / "sweep"
    job = {"backend": "slurm", "job_id": "7", "folder": str(sweep / "slurm"), "sweep_dir": str(sweep)}
    _fake_squeue(monkeypatch, backend, "PENDING")
    assert backend.status(job) == JobStatus(line="Slurm job 7: PENDING", state=None, requeued=False)
    launcher_module._mark_requeued(str(sweep), SlurmEnv(7, 1, 0, 1, 2, None, "node1"))
    marker = requeue_marker(sweep, 7)
    assert marker == sweep / "slurm" / "requeued-7.json" and json.loads(marker.read_text())["requeued_from_run"] == 1
    assert backend.status(job).requeued
    old_reference = {k: v for k, v in job.items() if k != "sweep_dir"}  # written before sweep_dir was recorded
    assert backend.status(old_reference).requeued
    _fake_squeue(monkeypatch, backend, "RUNNING")  # the next run has started (its node 0 removes the marker)
    assert not backend.status(job).requeued
    assert sorted(p.name for p in sweep.rglob("*")) == ["requeued-7.json", "slurm"]  # no state.json


@pytest.mark.parametrize("slurm_state, implied", [
    ("RUNNING", None), ("COMPLETED", None), ("CANCELLED by 0", SweepStatus.CANCELLED), ("TIMEOUT", SweepStatus.FAILED),
    ("OUT_OF_MEMORY", SweepStatus.FAILED), ("UNKNOWN", None),
])  # fmt: skip
def test_status_implies_only_how_a_job_ended_badly(tmp_path, monkeypatch, slurm_state, implied):
    backend = SlurmBackend(spec())
    _fake_squeue(monkeypatch, backend, slurm_state)
    status = backend.status({"backend": "slurm", "job_id": "9", "sweep_dir": str(tmp_path)})
    assert status.state is implied and status.line.startswith(f"Slurm job 9: {slurm_state}")


@pytest.mark.parametrize("slurm, state", [
    ("PENDING", "pending"), ("REQUEUED", "pending"), ("RUNNING", "running"), ("COMPLETING", "running"),
    ("COMPLETED", "finished"), ("CANCELLED by 0", "cancelled"), ("CANCELLED+", "cancelled"), ("FAILED", "failed"),
    ("TIMEOUT", "failed"), ("NODE_FAIL", "failed"), ("OUT_OF_MEMORY", "failed"), ("UNKNOWN", None),
    ("", None),
])  # fmt: skip
def test_sweep_states(slurm, state):
    assert sweep_state(slurm) == state and (state is None or isinstance(sweep_state(slurm), SweepStatus))
    assert SlurmJobStatus("1", slurm).terminal == (state in ("finished", "failed", "cancelled"))


def test_commands_say_when_slurm_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SlurmUnavailableError, match="login node"):
        SlurmBackend(spec()).submit(launch(tmp_path / "s"))
    with pytest.raises(SlurmUnavailableError, match="squeue"):
        SlurmBackend(spec()).status({"backend": "slurm", "job_id": "1"})


# ====================================================================================== on a real Slurm

# The driver the jobs run: it connects to the allocation's Ray cluster (RAY_ADDRESS, token from the file),
# runs one task pinned to each node, and writes runs/run-<n>.json; with "hold" its first run then waits
# (to be requeued, signalled or cancelled). On SIGINT it records whether CKD_STOP_FILE existed, and exits.
DRIVER = r'''
import json, os, pathlib, signal, sys, time
sweep, hold = pathlib.Path(sys.argv[1]), sys.argv[2] == "hold"
runs = sweep / "runs"
runs.mkdir(exist_ok=True)
n = len(list(runs.glob("run-*.json")))
def stop(signum, frame):
    stopping = os.path.exists(os.environ["CKD_STOP_FILE"])
    (runs / f"interrupted-{n}.json").write_text(json.dumps({"stop_file": stopping}))
    sys.exit(3)
signal.signal(signal.SIGINT, stop)
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init()
@ray.remote(num_cpus=1)
def where():
    return os.environ.get("SLURMD_NODENAME")
alive = [node for node in ray.nodes() if node["Alive"]]
names = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote()
                 for node in alive])
resources = ray.cluster_resources()
(runs / f"run-{n}.json").write_text(json.dumps({
    "restart": int(os.environ["CKD_SLURM_RESTART"]), "job": os.environ["CKD_SLURM_JOB_ID"], "nodes": sorted(names),
    "cpus": resources.get("CPU"), "gpus": resources.get("GPU", 0.0), "auth": os.environ.get("RAY_AUTH_MODE"),
    "launch_env": os.environ.get("CKD_TEST_LAUNCH_ENV"),
}))
ray.shutdown()
if hold and n == 0:
    time.sleep(900)
'''


def _release_requeued(backend: SlurmBackend, job_id: str, timeout: float = 90) -> None:
    """Wait until the requeued job is PENDING again, then let it start now (Slurm holds it ~2 min)."""
    _wait(f"job {job_id} to be pending after its requeue",
          lambda: backend.job_status(job_id).slurm_state == "PENDING", timeout)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)


def _command_lines() -> list[bytes]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                out.append((proc / "cmdline").read_bytes())
            except OSError:
                pass
    return out


def _submit(backend: SlurmBackend, sweep: Path, hold: bool) -> dict[str, Any]:
    driver = sweep.parent / f"{sweep.name}-driver.py"
    driver.write_text(DRIVER)
    return backend.submit(launch(sweep, [sys.executable, str(driver), str(sweep), "hold" if hold else "run"]))


def _logs(backend: SlurmBackend, job: dict[str, Any]) -> str:
    return backend.job_logs(job).read(tail=60)


def _expect_clean(job_id: str, sweep: Path) -> None:
    """Nothing of the job is left: no process, no Ray temp dir, no rendezvous dir (token)."""
    _wait("the job's processes to exit", lambda: not _processes_with(str(sweep)), 60,
          on_timeout=lambda: "\n".join(_processes_with(str(sweep))))
    assert not list(Path("/tmp").glob(f"ckd-{job_id}-*")), "Ray temp dirs left behind"
    assert not list((sweep / "slurm").glob("ray-*")), "rendezvous dir (token) left behind"


@pytest.fixture(scope="module")
def time_limit_job(slurm, tmp_path_factory) -> dict[str, Any]:
    """Submitted early (by the first real-Slurm test), checked by test_time_limit_...: its walltime warning
    comes while the other tests run. Limit 3 min, warning 60 s before it: Slurm sends the warning up to 60 s
    early, so 60-120 s into a run; a restart that takes longer is requeued again (max_timeouts covers it)."""
    cluster = SlurmClusterSpec.from_mapping({"backend": "slurm", "time": 3, "nodes": 1, "cpus_per_task": 2,
                                             "signal_delay_s": 60, "max_timeouts": 6})
    backend = SlurmBackend(cluster)
    sweep = tmp_path_factory.mktemp("slurm-timelimit") / "sweep"
    job = _submit(backend, sweep, hold=True)
    return {"backend": backend, "sweep": sweep, "job": job, "submitted": time.monotonic()}


def test_two_node_sweep_job_completes_and_survives_a_requeue(slurm, time_limit_job, tmp_path):
    nodes, gpus = min(2, len(slurm["nodes"])), int(slurm["gpus"])  # the testbed's fake GPUs, where mknod works
    cluster = SlurmClusterSpec.from_mapping({"backend": "slurm", "time": 10, "nodes": nodes, "cpus_per_task": 2,
                                             "gpus_per_node": gpus})
    backend = SlurmBackend(cluster)
    sweep = tmp_path / "sweep"
    job = _submit(backend, sweep, hold=True)
    job_id = job["job_id"]
    assert job_id.isdigit()
    assert backend.job_status(job_id).state in ("pending", "running")  # submit returned without waiting for the job
    assert job == {"backend": "slurm", "job_id": job_id, "folder": str(sweep.resolve() / "slurm"),
                   "sweep_dir": str(sweep.resolve()), "submitted": job["submitted"]}
    assert not (sweep / "state.json").exists()  # the orchestrator stores the reference, never the backend
    # plan shows exactly what sbatch got
    assert (sweep / "slurm" / f"{job_id}_submission.sh").read_text() == backend.sbatch_script(sweep)

    run0 = sweep / "runs" / "run-0.json"
    _wait("the driver's first run", run0.exists, 180, on_timeout=lambda: _logs(backend, job))
    first = json.loads(run0.read_text())
    expected_nodes = slurm["nodes"][:nodes] if nodes > 1 else first["nodes"]
    assert first["restart"] == 0 and first["job"] == job_id and first["auth"] == "token"
    assert first["launch_env"] == "1"  # the DriverLaunch's environment reaches the driver
    assert first["nodes"] == expected_nodes and len(first["nodes"]) == nodes  # a Ray task ran on every node
    assert (first["cpus"], first["gpus"]) == (2.0 * nodes, 1.0 * gpus * nodes)  # --num-cpus/--num-gpus: the spec
    assert f"Slurm job {job_id} run 0: starting the driver" in (sweep / "logs" / "driver.log").read_text()
    assert backend.logs(job, tail=5) is None  # the driver's log is in the sweep directory now

    # the token: a 0600 file in a 0700 directory, on no command line
    rdv = rendezvous_dir(sweep, job_id, 0)
    assert stat.S_IMODE(rdv.stat().st_mode) == 0o700 and stat.S_IMODE((rdv / "token").stat().st_mode) == 0o600
    token = (rdv / "token").read_text().strip()
    assert len(token) == 64 and not any(token.encode() in line for line in _command_lines())

    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    _wait(f"job {job_id} to be pending after its requeue",
          lambda: backend.job_status(job_id).slurm_state == "PENDING", 90)
    # the launcher left its requeue marker: `status` says the job waits for its next run
    requeued = backend.status(job)
    assert requeued.requeued and requeued.state is None, (requeued, _logs(backend, job))
    _release_requeued(backend, job_id)
    final = backend.wait(job_id, timeout=240)
    assert final.state == "finished", _logs(backend, job)
    _wait("sacct to show COMPLETED", lambda: _sacct_state(job_id) == "COMPLETED", 30)
    assert not requeue_marker(sweep, job_id).exists() and not backend.status(job).requeued

    runs = sorted((sweep / "runs").glob("run-*.json"))
    assert [p.name for p in runs] == ["run-0.json", "run-1.json"]
    second = json.loads(runs[1].read_text())
    assert second["restart"] == 1 and second["job"] == job_id and len(second["nodes"]) == nodes
    logs = backend.job_logs(job)
    assert len(logs.stdout) == nodes and all(p.exists() for p in logs.stdout)
    text = logs.read()
    assert "Ray head up at" in text and "restart 1" in text
    if nodes > 1:
        assert "joined" in text
    _expect_clean(job_id, sweep)


def test_time_limit_warning_checkpoints_and_requeues(slurm, time_limit_job):
    """Slurm's USR2 before the time limit: the driver is stopped with SIGINT after CKD_STOP_FILE appears, the
    job requeues itself (submitit checkpoint) and a later run finishes the job."""
    backend, sweep, job = time_limit_job["backend"], time_limit_job["sweep"], time_limit_job["job"]
    job_id = job["job_id"]
    deadline = time.monotonic() + 420
    while True:  # release every requeue at once (Slurm would hold each for ~2 min)
        status = backend.job_status(job_id)
        if status.terminal:
            break
        if status.slurm_state == "PENDING" and status.reason == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=30, check=False)
        assert time.monotonic() < deadline, f"job {job_id} still {status}\n{_logs(backend, job)}"
        time.sleep(1)
    assert status.state == "finished", _logs(backend, job)
    runs = sweep / "runs"
    assert json.loads((runs / "interrupted-0.json").read_text()) == {"stop_file": True}
    first, last = (json.loads((runs / f"run-{i}.json").read_text()) for i in (0, 1))
    assert last["restart"] > first["restart"] and not (runs / "run-2.json").exists()
    log = backend.job_logs(job).read()
    assert "Calling checkpoint method" in log and "Requeued job" in log
    assert not requeue_marker(sweep, job_id).exists()  # the last run removed the checkpoint's marker
    _expect_clean(job_id, sweep)


def test_cancel_stops_the_job_and_its_ray_cluster(slurm, tmp_path):
    cluster = SlurmClusterSpec.from_mapping({"backend": "slurm", "time": 10, "nodes": 1, "cpus_per_task": 2})
    backend = SlurmBackend(cluster)
    sweep = tmp_path / "sweep"
    job = _submit(backend, sweep, hold=True)
    job_id = job["job_id"]
    _wait("the driver's first run", (sweep / "runs" / "run-0.json").exists, 180,
          on_timeout=lambda: _logs(backend, job))
    assert _processes_with(str(sweep)), "the job's Ray and driver should be running"
    backend.cancel(job, timeout_s=60)  # returns once Slurm says the job ended
    status = backend.job_status(job_id)
    assert status.state == "cancelled", status
    assert backend.status(job).state is SweepStatus.CANCELLED
    _wait("sacct to show CANCELLED", lambda: _sacct_state(job_id) == "CANCELLED", 30)
    _expect_clean(job_id, sweep)  # the launcher cleans up on Slurm's SIGTERM
    assert "SIGTERM (job cancelled" in backend.job_logs(job).read()
    assert not requeue_marker(sweep, job_id).exists()  # a cancel is not a requeue
    backend.cancel(job, timeout_s=10)  # an ended job: nothing to do, no error


def test_node_ip_never_advertises_loopback(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyname", lambda name: {"gpu01": "10.1.2.3", "lo": "127.0.1.1"}[name])
    assert launcher_module._node_ip("gpu01") == "10.1.2.3"
    assert launcher_module._node_ip("lo") is None  # Ray then takes the default route's address
    monkeypatch.setattr(socket, "gethostbyname", lambda name: (_ for _ in ()).throw(OSError("unknown host")))
    assert launcher_module._node_ip("nowhere") is None


# ========================================================================== the backend's status and logs


def test_describe_job_lines():
    assert describe_job(SlurmJobStatus("12", "RUNNING", nodes="node[1-2]", elapsed="3:10", source="squeue")) == (
        "Slurm job 12: RUNNING on node[1-2] (elapsed 3:10)")
    assert describe_job(SlurmJobStatus("13", "PENDING", reason="BeginTime", nodes="", elapsed="0:00",
                                       source="squeue")) == "Slurm job 13: PENDING (BeginTime) (elapsed 0:00)"
    assert describe_job(SlurmJobStatus("14", "FAILED", exit_code="3:0", elapsed="00:00:05", nodes="node1",
                                       source="sacct")) == (
        "Slurm job 14: FAILED on node1 (elapsed 00:00:05, exit code 3:0)")
    assert "not known to squeue or sacct" in describe_job(SlurmJobStatus("15", "UNKNOWN"))


def test_status_needs_a_slurm_job_reference():
    with pytest.raises(LookupError, match=r"no Slurm job recorded under 'backend'"):
        SlurmBackend(spec()).status({"backend": "local", "pid": 1})


def test_status_implies_the_end_of_a_job_that_ended_behind_the_drivers_back(slurm, tmp_path):
    """A job killed from outside (scancel) or failing before its driver could record it: `status` says how it
    ended (the orchestrator applies that only to a sweep still pending or running); `logs` shows Slurm's own
    logs until the driver has written its log in the sweep directory."""

    def sbatch(command: str) -> str:
        out = subprocess.run(["sbatch", "--parsable", "-o", str(tmp_path / "%j.out"), "--wrap", command],
                             capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip().split(";")[0]

    backend = SlurmBackend(spec())

    def reference(name: str, job_id: str) -> dict[str, Any]:
        sweep = tmp_path / name
        return {"backend": "slurm", "job_id": job_id, "folder": str(sweep / "slurm"), "sweep_dir": str(sweep)}

    cancelled, failed = reference("cancelled", sbatch("sleep 120")), reference("failed", sbatch("exit 3"))
    job = cancelled["job_id"]
    _wait("the sleeping job to run", lambda: backend.job_status(job).slurm_state == "RUNNING", 60)
    status = backend.status(cancelled)
    assert status.line.startswith(f"Slurm job {job}: RUNNING on ") and status.state is None and not status.requeued
    subprocess.run(["scancel", job], check=True, timeout=30)
    _wait("the job to be cancelled", lambda: backend.job_status(job).state == "cancelled", 60)
    status = backend.status(cancelled)
    assert status.line.startswith(f"Slurm job {job}: CANCELLED") and status.state is SweepStatus.CANCELLED

    _wait("the failing job to end", lambda: backend.job_status(failed["job_id"]).terminal, 60)
    status = backend.status(failed)
    assert f"Slurm job {failed['job_id']}: FAILED" in status.line and status.state is SweepStatus.FAILED
    # no driver log yet: what Slurm knows instead; once the driver has written its log, the CLI reads that
    driver_log = tmp_path / "failed" / "logs" / "driver.log"
    assert backend.logs(failed, tail=5).startswith(f"(the driver has not started: no {driver_log};")
    driver_log.parent.mkdir(parents=True)
    driver_log.write_text("driver output\n")
    assert backend.logs(failed, tail=5) is None

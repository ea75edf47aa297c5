"""The `ray` backend against a real Ray cluster: `ray start --head` on loopback with its own ports, temp dir
and token (token authentication on, as Ray 2.59+ does by default), stopped at the end by signalling only
its own process group. Sweeps are submitted with the CLI through the Ray Jobs API; MLflow (SQLite under the
test's directory, which the cluster shares) is the system of record checked afterwards.

The first sweep keeps its directory on the cluster under `cluster.sweep_root`, a directory the submitting
side never reads: the driver builds it from the record shipped in the job's environment, and `status`
learns the parent run and the champion from MLflow. The second uses the default (the same path on both
sides, as with a shared file system) and is cancelled mid-run.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import yaml

from cluster.ray import RayBackend, RayBackendError, auth_headers, read_token
from jobkit import REPO, cli, only_sweep, sweep_base_job, write_yaml
from jobs.distributed import free_port
from orchestrator.grid import load_grid
from orchestrator.launch import bootstrap_sweep, sweep_record
from orchestrator.state import SweepDir

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# ------------------------------------------------------------------------------------------ the cluster


@dataclass
class RayCluster:
    address: str
    token: str
    token_file: Path

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})

    def wait(self, job_id: str, statuses: tuple[str, ...], timeout: float) -> str:
        client = self.client()
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            status = client.get_job_status(job_id).value
            if status in statuses:
                return status
            time.sleep(2)
        raise AssertionError(f"Ray job {job_id} still {status} after {timeout:g} s\n"
                             + client.get_job_logs(job_id)[-6000:])


def _distinct_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    token = secrets.token_hex(16)
    token_file = tmp_path_factory.mktemp("ray-auth") / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    temp_dir = tempfile.mkdtemp(prefix="ckdray-", dir="/tmp")  # short: Ray's Unix socket paths must fit
    log = tmp_path_factory.mktemp("ray-head") / "ray.log"
    # Every port this head listens on is our own, so it never meets another Ray running on the machine.
    gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env, node_manager, object_manager = _distinct_ports(9)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(name, None)
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=4", "--num-gpus=0",
               "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
               f"--port={gcs}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    cluster = RayCluster(f"http://127.0.0.1:{dashboard}", token, token_file)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ray start exited with {proc.returncode}\n{log.read_text()[-4000:]}")
            try:
                cluster.client().list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the Ray dashboard did not answer\n{log.read_text()[-4000:]}") from None
                time.sleep(2)
        yield cluster
    finally:
        # Only this head's process group: `ray stop` would stop every Ray of the user on the machine.
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_grid(tmp_path: Path, glue_dir: Path, teacher: Path, address: str, *, epochs: int = 1,
             **cluster: object) -> Path:
    """Two trials (two learning rates) of the tiny RTE job, one worker each, on the Ray cluster at `address`."""
    job = sweep_base_job(glue_dir, teacher, epochs=epochs, log_every_steps=4)
    grid = {"job": job,
            "sweep": {"space": {"training.learning_rate": {"grid": [1e-4, 3e-4]}},
                      "resources": {"workers": 1, "cpus_per_worker": 1}},
            "cluster": {"backend": "ray", "address": address, **cluster},
            "mlflow": {"experiment": "tiny-ray", "registered_model": "tiny-ray-student"},
            "root": str(tmp_path / "sweeps")}
    return write_yaml(tmp_path / "tiny_ray.yaml", grid)


def state_of(sweep: Path) -> dict:
    return json.loads((sweep / "state.json").read_text())


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_the_quickstart_runs_on_the_ray_cluster_to_a_registered_champion(tmp_path, ray_cluster, monkeypatch):
    """examples/quickstart_ray.yaml, the quickstart grid with only its cluster block changed; the driver keeps
    its sweep directory under cluster.sweep_root, away from the submitting side's copy."""
    env = {"CKD_CACHE_DIR": str(tmp_path / "cache"), "RAY_AUTH_TOKEN_PATH": str(ray_cluster.token_file)}
    subprocess.run([sys.executable, "examples/quickstart_data.py"], cwd=REPO, check=True, capture_output=True)
    remote_root = tmp_path / "on-the-cluster"
    grid = REPO / "examples" / "quickstart_ray.yaml"
    overrides = ["--set", f"cluster.address={ray_cluster.address}", "--set", f"cluster.sweep_root={remote_root}",
                 "--set", f"root={tmp_path / 'sweeps'}"]
    submitted = cli("submit", str(grid), *overrides, env=env, timeout=300)
    sweep = only_sweep(tmp_path / "sweeps")
    sweep_id = sweep.name
    assert sweep_id in submitted.stdout
    backend = state_of(sweep)["backend"]
    assert backend == {"backend": "ray", "job_id": sweep_id, "attempt": 1, "address": ray_cluster.address,
                       "sweep_dir": str(remote_root / sweep_id)}

    assert ray_cluster.wait(sweep_id, TERMINAL, timeout=1800) == "SUCCEEDED"
    # The driver built its sweep directory from the shipped record, identical to the submitted one.
    remote = remote_root / sweep_id
    assert json.loads((remote / "sweep.json").read_text()) == json.loads((sweep / "sweep.json").read_text())
    assert (remote / "grid.yaml").read_text() == (sweep / "grid.yaml").read_text()
    assert state_of(remote)["status"] == "finished"
    assert "parent_run_id" not in state_of(sweep)  # the submitting side's copy knows nothing yet ...

    store = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    runs = store.search_runs([store.get_experiment_by_name("quickstart").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("ckd.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("ckd.role") == "trial"]
    assert parent.data.tags["ckd.sweep_id"] == sweep_id and parent.info.status == "FINISHED"
    assert len(children) == 4 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert len({c.data.tags["ckd.trial_label"] for c in children}) == 4  # CKD / logit KD x 2 / 1 layers
    version = store.get_model_version_by_alias("quickstart", "champion")
    assert version.tags["ckd.sweep_id"] == sweep_id
    best = max(c.data.metrics["best/accuracy"] for c in children)
    assert store.get_run(version.run_id).data.metrics["best/accuracy"] == best
    assert version.run_id in {c.info.run_id for c in children}

    status = cli("status", sweep_id, env=env).stdout
    assert "SUCCEEDED" in status and "finished" in status and "champion" in status
    local = state_of(sweep)  # ... until `status` asked MLflow
    assert local["status"] == "finished" and local["parent_run_id"] == parent.info.run_id
    assert local["champion"] == state_of(remote)["champion"]
    logs = cli("logs", sweep_id, "--tail", "30", env=env).stdout
    assert f"sweep {sweep_id} finished" in logs and len(logs.splitlines()) <= 30
    best_out = cli("best", sweep_id, env=env).stdout
    assert "models:/quickstart@champion" in best_out

    # The token authenticates the requests only: it is in no output, no state and not in the job itself.
    for text in (submitted.stdout, submitted.stderr, status, logs, (sweep / "state.json").read_text(),
                 str(ray_cluster.client().get_job_info(sweep_id))):
        assert ray_cluster.token not in text

    # The submission id is the sweep id: a sweep whose record of its job was lost cannot be queued twice.
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(ray_cluster.token_file))
    (sweep / "state.json").write_text(json.dumps({**state_of(sweep), "backend": {}}))
    from orchestrator.control import start_driver

    submitted_grid = load_grid(grid, [o for o in overrides if o != "--set"])
    with pytest.raises(RayBackendError, match="exists already"):
        start_driver(SweepDir(sweep), submitted_grid, RayBackend(submitted_grid.cluster))


@pytest.mark.slow
def test_cancel_stops_the_ray_job_and_marks_the_sweep_cancelled(tmp_path, glue_dir, tiny_teacher, ray_cluster):
    env = {"CKD_CACHE_DIR": str(tmp_path / "cache"), "RAY_AUTH_TOKEN_PATH": str(ray_cluster.token_file)}
    grid = ray_grid(tmp_path, glue_dir, tiny_teacher, ray_cluster.address, epochs=20)
    cli("submit", str(grid), env=env, timeout=300)
    sweep = only_sweep(tmp_path / "sweeps")
    sweep_id = sweep.name
    ray_cluster.wait(sweep_id, ("RUNNING",), timeout=120)
    # The directory is the same on both sides here: the driver's own progress shows in it. Cancel once Tune
    # runs the trials (its experiment directory exists).
    deadline = time.monotonic() + 300
    while not (sweep / "tune").is_dir() and time.monotonic() < deadline:
        time.sleep(1)
    assert state_of(sweep)["status"] == "running" and state_of(sweep).get("parent_run_id")

    out = cli("cancel", sweep_id, env=env, timeout=300).stdout
    assert "cancelled" in out
    assert ray_cluster.client().get_job_status(sweep_id).value == "STOPPED"
    assert state_of(sweep)["status"] == "cancelled"
    store = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    assert store.get_run(state_of(sweep)["parent_run_id"]).info.status == "KILLED"  # the driver unwound
    assert "STOPPED" in cli("status", sweep_id, env=env).stdout

    # `resume` submits the driver again under the next submission id; it continues the same sweep.
    resumed = cli("resume", sweep_id, env=env, timeout=300).stdout
    assert f"{sweep_id}-r2" in resumed
    assert state_of(sweep)["backend"]["job_id"] == f"{sweep_id}-r2"
    ray_cluster.wait(f"{sweep_id}-r2", ("RUNNING",), timeout=120)
    assert "cancelled" in cli("cancel", sweep_id, env=env, timeout=300).stdout
    assert ray_cluster.client().get_job_status(f"{sweep_id}-r2").value == "STOPPED"
    assert state_of(sweep)["status"] == "cancelled"


@pytest.mark.slow
def test_an_unreachable_address_or_a_wrong_token_is_refused_before_anything_is_queued(
        tmp_path, glue_dir, tiny_teacher, ray_cluster):
    (closed,) = _distinct_ports(1)
    grid = ray_grid(tmp_path, glue_dir, tiny_teacher, f"http://127.0.0.1:{closed}")
    proc = cli("submit", str(grid), check=False, timeout=120, env={"RAY_AUTH_TOKEN_PATH": str(ray_cluster.token_file)})
    assert proc.returncode == 2
    assert f"cannot use the Ray cluster at http://127.0.0.1:{closed}" in proc.stderr
    assert not (tmp_path / "sweeps").exists() or not any((tmp_path / "sweeps").iterdir())

    grid = ray_grid(tmp_path, glue_dir, tiny_teacher, ray_cluster.address)
    wrong = "not-the-token-" + secrets.token_hex(8)
    proc = cli("submit", str(grid), check=False, timeout=120, env={"RAY_AUTH_TOKEN": wrong})
    assert proc.returncode == 2
    assert "is not this cluster's" in proc.stderr
    assert wrong not in proc.stdout + proc.stderr
    assert not (tmp_path / "sweeps").exists() or not any((tmp_path / "sweeps").iterdir())


# ------------------------------------------------------------------------------------------ units


def test_the_token_is_read_the_ray_ways_in_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path = tmp_path / "token"
    path.write_text("  from-path\n")
    assert read_token({}, home) == "from-home"
    assert read_token({"RAY_AUTH_TOKEN_PATH": str(path)}, home) == "from-path"
    assert read_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path)}, home) == "from-env"
    assert read_token({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "from-env"}, home) is None
    assert read_token({}, tmp_path / "nobody") is None
    assert auth_headers({"RAY_AUTH_TOKEN": "t0k"}, home) == {"Authorization": "Bearer t0k"}
    assert auth_headers({}, tmp_path / "nobody") == {}
    with pytest.raises(RayBackendError, match=r"RAY_AUTH_TOKEN_PATH=.*missing.*cannot read") as err:
        read_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)
    assert "from-home" not in str(err.value)


def _sweep_with_record(tmp_path: Path) -> SweepDir:
    sweep = SweepDir(tmp_path / "here" / "grid-20261121-000000-abcd")
    (sweep.path / "logs").mkdir(parents=True)
    (sweep.path / "grid.yaml").write_text("job: job.yaml  # as submitted from $HOME\n")
    (sweep.path / "sweep.json").write_text(json.dumps({"sweep_id": sweep.sweep_id, "grid_file": "/x/grid.yaml",
                                                       "grid": {"root": "/x/sweeps"}, "created": "now",
                                                       "git_commit": None}))
    return sweep


def test_the_driver_bootstraps_a_missing_sweep_dir_and_continues_an_existing_one(tmp_path):
    sweep = _sweep_with_record(tmp_path)
    record = sweep_record(sweep)
    there = SweepDir(tmp_path / "there" / sweep.sweep_id)
    assert bootstrap_sweep(there, record) is True
    assert there.record() == sweep.record()
    assert (there.path / "grid.yaml").read_text() == (sweep.path / "grid.yaml").read_text()
    assert there.state()["status"] == "pending" and (there.path / "logs").is_dir()
    there.update_state(status="running", parent_run_id="r1")  # a first attempt got this far
    assert bootstrap_sweep(there, record) is False  # a retry continues it
    assert there.state()["parent_run_id"] == "r1"

    with pytest.raises(ValueError, match="record is of sweep 'grid-20261121-000000-abcd'"):
        bootstrap_sweep(SweepDir(tmp_path / "there" / "other-id"), record)
    with pytest.raises(ValueError, match="CKD_SWEEP_RECORD: expected the base64 JSON record"):
        bootstrap_sweep(SweepDir(tmp_path / "new"), base64.b64encode(json.dumps({"sweep": {}}).encode()).decode())
    with pytest.raises(ValueError, match="CKD_SWEEP_RECORD: expected the base64 JSON record"):
        bootstrap_sweep(SweepDir(tmp_path / "new"), json.dumps({"sweep": {}}))  # not encoded
    # `$NAME` in a grid survives the trip: the record holds no `$` for Ray's variable expansion to rewrite.
    assert "$" not in record and "$HOME" in (there.path / "grid.yaml").read_text()


def test_the_driver_entry_refuses_a_missing_record_clearly(tmp_path, capsys, monkeypatch):
    from orchestrator.driver import main

    monkeypatch.delenv("CKD_SWEEP_RECORD", raising=False)
    assert main([str(tmp_path / "s"), "--bootstrap-env", "CKD_SWEEP_RECORD"]) == 2
    assert "--bootstrap-env CKD_SWEEP_RECORD: the variable is not set" in capsys.readouterr().err
    assert main([str(tmp_path / "s")]) == 2
    assert "is not a sweep directory" in capsys.readouterr().err


def test_ray_cluster_keys_are_validated_with_their_key(tmp_path, glue_dir, tiny_teacher):
    from jobs.spec import SpecError

    good = ray_grid(tmp_path, glue_dir, tiny_teacher, "http://head:8265", sweep_root="/shared/sweeps/",
                    env_vars={"HF_HOME": "/shared/hf"}, excludes=["*.ckpt"])
    cluster = load_grid(good).cluster
    assert (cluster.sweep_root, cluster.env_vars, cluster.excludes) == ("/shared/sweeps", {"HF_HOME": "/shared/hf"},
                                                                         ["*.ckpt"])
    for changes, key, message in (
        ({"sweep_root": "relative/dir"}, "cluster.sweep_root", "expected an absolute path"),
        ({"env_vars": {"RAY_AUTH_TOKEN": "x"}}, "cluster.env_vars", "must not be written in a grid"),
        ({"env_vars": {"1BAD": "x"}}, "cluster.env_vars", "not an environment variable name"),
        ({"address": "head:8265"}, "cluster.address", "http(s)://host:port"),
    ):
        data = yaml.safe_load(good.read_text())
        data["cluster"].update(changes)
        bad = write_yaml(tmp_path / "bad.yaml", data)
        with pytest.raises(SpecError) as err:
            load_grid(bad)
        found = [i for i in err.value.issues if i.key.startswith(key)]
        assert found and message in found[0].message, err.value


def test_the_ray_quickstart_is_the_quickstart_but_for_its_cluster_block():
    quickstart = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    on_ray = yaml.safe_load((REPO / "examples" / "quickstart_ray.yaml").read_text())
    assert on_ray["cluster"]["backend"] == "ray"
    assert {k: v for k, v in on_ray.items() if k != "cluster"} == {k: v for k, v in quickstart.items()
                                                                      if k != "cluster"}

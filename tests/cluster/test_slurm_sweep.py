"""The REAL sweep driver through a Slurm allocation, from the CLI, on the test Slurm (cluster/slurm/testbed.sh):
`ckd-orchestrate submit grid.yaml` with `cluster: {backend: slurm}` returns the job id and sweep id while the
job is still queued or running; `status`, `logs` and `cancel` work against Slurm and the sweep directory.

Two sweeps run side by side (the testbed has two emulated nodes):
- sweep A spans both nodes (a Ray head and a Ray worker node, 2 CPUs each) with trials of 2 Ray Train
  workers of 1.5 CPUs, which therefore land on different nodes; it is requeued with `scontrol requeue` while a
  trial trains, and must end COMPLETED with every trial trained once (resumed, not restarted), MLflow's parent
  and child runs and the champion alias;
- sweep B (one node) is cancelled with `ckd-orchestrate cancel` once its driver runs the sweep.

Tiny teacher and slices of the real RTE files; MLflow on SQLite in the test's tmp dir (the "nodes" share this
machine's file system; a real cluster uses a tracking server).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import pytest
from jobkit import cli, sweep_base_job, write_yaml
from slurmkit import processes_with, queued_job_ids, release_now, sacct_state, slurm, wait_until  # noqa: F401

from cluster.slurm.backend import SlurmBackend
from cluster.slurm.config import SlurmClusterSpec

pytestmark = pytest.mark.slow


def slurm_grid(glue_dir: Path, teacher: Path, tmp_path: Path, name: str, cluster: dict[str, Any],
               epochs: int) -> Path:
    job = sweep_base_job(glue_dir, teacher, epochs=epochs, log_every_steps=8)
    grid = {"job": job,
            "sweep": {"space": {"training.learning_rate": {"grid": [1e-4, 3e-4]}},
                      # 2 x 1.5 CPUs: two workers never fit one 2-CPU node
                      "resources": {"workers": 2, "cpus_per_worker": 1.5}},
            "cluster": {"backend": "slurm", "time": 30, **cluster},
            "mlflow": {"experiment": name, "registered_model": f"{name}-student",
                       "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "root": str(tmp_path / name)}
    return write_yaml(tmp_path / f"{name}.yaml", grid)


def submitted(proc: subprocess.CompletedProcess, root: Path) -> tuple[Path, str]:
    """The sweep directory and Slurm job id `submit` printed."""
    sweep_id = proc.stdout.strip().splitlines()[-1]
    job = re.search(r"slurm job (\d+)", proc.stdout)
    assert job, proc.stdout
    sweep = root / sweep_id
    assert json.loads((sweep / "state.json").read_text())["backend"]["job_id"] == job.group(1)
    return sweep, job.group(1)


def trial_training(sweep: Path) -> Path | None:
    """A trial that has evaluated and checkpointed at least once and is not finished (the job writes
    metrics.json before the evaluation's checkpoint: wait for the checkpoint's `latest` too)."""
    for metrics in (sweep / "trials").glob("*/metrics.json"):
        data = json.loads(metrics.read_text())
        if data.get("history") and "summary" not in data and (metrics.parent / "checkpoints" / "latest").is_file():
            return metrics.parent
    return None


def worker_nodes(sweep: Path) -> set[str]:
    """The Slurm nodes (SLURMD_NODENAME, inherited from each node's launcher task) of the Ray Train workers
    running for `sweep` now (their environment carries the token path, under the sweep directory)."""
    nodes = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                environ = dict(item.split(b"=", 1) for item in (proc / "environ").read_bytes().split(b"\0")
                               if b"=" in item)
                if str(sweep).encode() in environ.get(b"RAY_AUTH_TOKEN_PATH", b""):
                    nodes.add(environ.get(b"SLURMD_NODENAME", b"?").decode())
        except OSError:
            continue
    return nodes


def job_of(sweep: Path) -> dict[str, Any]:
    """The sweep's job reference, as `submit` stored it in state.json."""
    return json.loads((sweep / "state.json").read_text())["backend"]


def debug(backend: SlurmBackend, job_id: str, sweep: Path) -> str:
    log = sweep / "logs" / "driver.log"
    return (backend.job_logs(job_of(sweep)).read(tail=40) + "\n--- driver.log\n"
            + ("\n".join(log.read_text().splitlines()[-80:]) if log.is_file() else "(none)"))


def test_sweep_on_slurm_submit_requeue_cancel_status_logs(slurm, tmp_path, glue_dir, tiny_teacher):  # noqa: F811
    if len(slurm["nodes"]) < 2:
        pytest.skip(f"the testbed has one node ({slurm['nodes']}); this test spans two")
    backend = SlurmBackend(SlurmClusterSpec.from_mapping({"time": 30}))  # reads the jobs' state only
    env = {"CKD_CACHE_DIR": str(tmp_path / "cache")}
    # 8 epochs (64 steps, an evaluation and checkpoint every 8): a window of seconds for the requeue
    grid_a = slurm_grid(glue_dir, tiny_teacher, tmp_path, "spanning", {"nodes": 2, "cpus_per_task": 2}, epochs=8)
    grid_b = slurm_grid(glue_dir, tiny_teacher, tmp_path, "cancelled", {"nodes": 1, "cpus_per_task": 4}, epochs=1)

    sweep_a, job_a = submitted(cli("submit", str(grid_a), env=env, timeout=120), tmp_path / "spanning")
    # submit returned while the job is queued or running, with the sweep id and job id
    assert backend.job_status(job_a).state in ("pending", "running")
    sweep_b, job_b = submitted(cli("submit", str(grid_b), env=env, timeout=120), tmp_path / "cancelled")

    # --- B: cancel while its driver runs the sweep (on Ray over the allocation)
    wait_until("sweep B's driver to run", lambda: json.loads((sweep_b / "state.json").read_text()).get(
        "parent_run_id"), 300, on_timeout=lambda: debug(backend, job_b, sweep_b))
    assert processes_with(str(sweep_b)), "B's Ray and driver should be running"
    cli("cancel", sweep_b.name, env=env, timeout=300)
    assert json.loads((sweep_b / "state.json").read_text())["status"] == "cancelled"
    assert job_b not in queued_job_ids()
    wait_until("sacct to show B CANCELLED", lambda: sacct_state(job_b) == "CANCELLED", 60)
    wait_until("B's processes (Ray, driver, trials) to exit", lambda: not processes_with(str(sweep_b)), 60,
               on_timeout=lambda: "\n".join(processes_with(str(sweep_b))))
    status_b = cli("status", sweep_b.name, env=env, timeout=120).stdout
    assert "cancelled" in status_b and f"Slurm job {job_b}: CANCELLED" in status_b, status_b

    # --- A: requeue while a trial trains; the requeued job restores the sweep
    interrupted = wait_until("a trial of sweep A to have checkpointed", lambda: trial_training(sweep_a), 600,
                             interval=0.5, on_timeout=lambda: debug(backend, job_a, sweep_a))
    # the trial's two workers run on the two nodes
    assert worker_nodes(sweep_a) == set(slurm["nodes"][:2]), debug(backend, job_a, sweep_a)
    subprocess.run(["scontrol", "requeue", job_a], check=True, timeout=30)
    wait_until(f"job {job_a} to be pending after its requeue",
               lambda: backend.job_status(job_a).slurm_state == "PENDING", 90)
    # the launcher left its requeue marker once the driver was gone; `status` reads it through the backend and
    # records the sweep as waiting for the next run, not failed or cancelled
    assert backend.status(job_of(sweep_a)).requeued, debug(backend, job_a, sweep_a)
    status_a = cli("status", sweep_a.name, env=env, timeout=120).stdout
    assert f"Slurm job {job_a}: PENDING (BeginTime)" in status_a and interrupted.name in status_a, status_a
    assert json.loads((sweep_a / "state.json").read_text())["status"] == "pending", debug(backend, job_a, sweep_a)
    release_now(job_a)
    final = backend.wait(job_a, timeout=900, interval=2)
    assert final.state == "finished", debug(backend, job_a, sweep_a)
    wait_until("sacct to show A COMPLETED", lambda: sacct_state(job_a) == "COMPLETED", 60)
    state = json.loads((sweep_a / "state.json").read_text())
    assert state["status"] == "finished", state

    # every trial trained once: one fresh start each; the interrupted one continued from its checkpoint
    trials = sorted((sweep_a / "trials").iterdir())
    assert len(trials) == 2
    for trial in trials:
        starts = [line for line in (trial / "job.log").read_text().splitlines() if line.startswith("job started")]
        assert sum(line.endswith("fresh") for line in starts) == 1, (trial.name, starts)
        assert all("(2 process(es))" in line for line in starts), starts
        assert "summary" in json.loads((trial / "metrics.json").read_text())
    resumed = [line for line in (interrupted / "job.log").read_text().splitlines() if "checkpoint at step" in line]
    assert resumed, (interrupted / "job.log").read_text()

    # MLflow: one parent, one child run per trial, the champion alias on one of them
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("spanning").experiment_id])
    parents = [r for r in runs if r.data.tags.get("ckd.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("ckd.role") == "trial"]
    assert [p.info.run_id for p in parents] == [state["parent_run_id"]] and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and {c.data.tags["mlflow.parentRunId"] for c in children} == {state["parent_run_id"]}
    assert {c.data.tags["ckd.trial_id"] for c in children} == {t.name for t in trials}
    version = client.get_model_version_by_alias("spanning-student", "champion")
    assert version.run_id in {c.info.run_id for c in children} and state["champion"]["run_id"] == version.run_id

    # status: the Slurm line and the trials; logs: the driver's log (both runs of the job)
    status_a = cli("status", sweep_a.name, env=env, timeout=120).stdout
    assert f"Slurm job {job_a}: COMPLETED" in status_a and "finished" in status_a, status_a
    assert all(t.name in status_a for t in trials) and "champion" in status_a
    log = cli("logs", sweep_a.name, env=env, timeout=120).stdout
    assert f"Slurm job {job_a} run 0: starting the driver" in log and f"Slurm job {job_a} run 1:" in log, log[-3000:]
    assert "restoring the Tune experiment" in log and f"sweep {sweep_a.name} finished: champion" in log
    wait_until("A's processes to exit", lambda: not processes_with(str(sweep_a)), 60,
               on_timeout=lambda: "\n".join(processes_with(str(sweep_a))))

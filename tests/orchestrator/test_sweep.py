"""The sweep end to end on the embedded local backend: Ray Tune + Ray Train V2 with 2 DeepSpeed workers per
trial, ASHA, MLflow parent/child runs on SQLite, the registry, `pull`, `status`/`best`, and `resume` after
the driver was killed. Tiny teacher, slices of the real RTE files."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from jobkit import cli, only_sweep, sweep_base_job, write_yaml

pytestmark = pytest.mark.slow


def tiny_grid(glue_dir: Path, teacher: Path, tmp_path: Path, learning_rates: list[float], **sweep: dict) -> Path:
    job = sweep_base_job(glue_dir, teacher, epochs=2, log_every_steps=4)
    grid = {"job": job,
            "sweep": {"space": {"training.learning_rate": {"grid": learning_rates}},
                      "resources": {"workers": 2, "cpus_per_worker": 1}, **sweep},
            "cluster": {"backend": "local", "num_cpus": 4},
            "mlflow": {"experiment": "tiny", "registered_model": "tiny-student"},
            "root": str(tmp_path / "sweeps")}
    return write_yaml(tmp_path / "tiny.yaml", grid)


def test_sweep_with_asha_registers_and_pulls_the_champion(tmp_path, glue_dir, tiny_teacher):
    env = {"CKD_CACHE_DIR": str(tmp_path / "cache")}
    grid = tiny_grid(glue_dir, tiny_teacher, tmp_path, [3e-3, 1e-4, 1e-6],
                     scheduler={"kind": "asha", "grace_period": 1, "reduction_factor": 2})
    cli("submit", str(grid), env=env, timeout=1500)
    sweep = only_sweep(tmp_path / "sweeps")
    state = json.loads((sweep / "state.json").read_text())
    assert state["status"] == "finished"

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("ckd.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("ckd.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.run_id == state["parent_run_id"]
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {state["parent_run_id"]}
    assert sorted(float(c.data.params["trial.training.learning_rate"]) for c in children) == [1e-6, 1e-4, 3e-3]
    for child in children:
        history = client.get_metric_history(child.info.run_id, "eval/accuracy")
        assert history and all(h.step > 0 for h in history)

    # The alias sits on the best trial that ran to the end (a logged student) by its best dev accuracy;
    # trials ASHA stopped early end FINISHED too, tagged as such, without a student.
    assert {c.info.status for c in children} == {"FINISHED"}
    finished = [c for c in children if "student/parameters" in c.data.metrics]
    assert {c.data.tags.get("ckd.stopped_early") for c in children if c not in finished} <= {"true"}
    top = max(c.data.metrics["best/accuracy"] for c in finished)
    version = client.get_model_version_by_alias("tiny-student", "champion")
    assert client.get_run(version.run_id).data.metrics["best/accuracy"] == top
    assert version.tags["ckd.sweep_id"] == sweep.name
    assert state["champion"]["run_id"] == version.run_id

    # pull gives a Hugging Face directory that predicts exactly like the trial's exported student.
    dest = tmp_path / "champion"
    cli("pull", "models:/tiny-student@champion", "--dest", str(dest),
        "--tracking-uri", f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}", env=env)
    pulled = AutoModelForSequenceClassification.from_pretrained(dest).eval()
    tokenizer = AutoTokenizer.from_pretrained(dest)
    original = AutoModelForSequenceClassification.from_pretrained(
        sweep / "trials" / version.tags["ckd.trial_id"] / "student").eval()
    batch = tokenizer(["A man is playing a guitar.", "Nobody plays."], ["Someone makes music.", "A band plays."],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(pulled(**batch).logits, original(**batch).logits)
    assert pulled.config.id2label == {0: "entailment", 1: "not_entailment"}

    status = cli("status", str(sweep), env=env).stdout
    assert "finished" in status and "champion" in status
    best = cli("best", str(sweep), env=env).stdout
    assert "models:/tiny-student@champion" in best and version.run_id in best
    assert (sweep / "report.png").is_file()


def test_resume_after_the_driver_is_killed_does_not_rerun_finished_trials(tmp_path, glue_dir, tiny_teacher):
    env = {"CKD_CACHE_DIR": str(tmp_path / "cache")}
    grid = tiny_grid(glue_dir, tiny_teacher, tmp_path, [1e-4, 3e-4])
    proc = cli("submit", str(grid), "--detach", env=env)
    sweep_id = proc.stdout.strip().splitlines()[-1]
    sweep = tmp_path / "sweeps" / sweep_id
    pid = json.loads((sweep / "state.json").read_text())["backend"]["pid"]

    deadline = time.monotonic() + 900
    finished_trial = None
    while finished_trial is None and time.monotonic() < deadline:
        for metrics in (sweep / "trials").glob("*/metrics.json"):
            if "summary" in json.loads(metrics.read_text()):
                finished_trial = metrics.parent
        time.sleep(2)
    assert finished_trial is not None, (sweep / "logs" / "driver.log").read_text()[-3000:]
    time.sleep(3)  # let Tune record the finished trial in its experiment state
    os.killpg(pid, signal.SIGKILL)  # the driver, mid-sweep
    # ... and the Ray it started (recorded with the job), as a machine crash would
    for ray_pid in json.loads((sweep / "state.json").read_text())["backend"]["ray_pids"]:
        try:
            os.kill(ray_pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(2)
    assert json.loads((sweep / "state.json").read_text())["status"] == "running"
    log_before = (finished_trial / "job.log").read_text()

    cli("resume", sweep_id, env=env, timeout=1500)
    state = json.loads((sweep / "state.json").read_text())
    assert state["status"] == "finished"
    # Not trained again: Tune may not have recorded the finish before the kill and start the trial once
    # more, but the job sees its finished checkpoint and only reports its result.
    new_lines = (finished_trial / "job.log").read_text()[len(log_before):].splitlines()
    assert all(line.startswith("job started") and line.endswith("finished") for line in new_lines), new_lines
    assert sorted(p.name for p in (sweep / "trials").iterdir()) == sorted(
        p.parent.name for p in (sweep / "trials").glob("*/metrics.json"))
    assert len(list((sweep / "trials").iterdir())) == 2
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'sweeps' / 'mlflow.db'}")
    children = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                  filter_string="tags.`ckd.role` = 'trial'")
    assert len(children) == 2  # a resumed trial continues its own child run
    assert client.get_model_version_by_alias("tiny-student", "champion").run_id in {c.info.run_id for c in children}


def test_plan_rejects_a_bad_grid_with_the_exact_key(tmp_path, glue_dir, tiny_teacher):
    grid = tiny_grid(glue_dir, tiny_teacher, tmp_path, [1e-4])
    text = grid.read_text().replace("cpus_per_worker: 1", "cpus_per_worker: 1\n    gpus_per_wrker: 1")
    grid.write_text(text)
    proc = cli("plan", str(grid), check=False, timeout=120)
    assert proc.returncode == 2
    assert "sweep.resources.gpus_per_wrker" in proc.stderr and str(grid) in proc.stderr


def test_cancel_stops_a_detached_sweep(tmp_path, glue_dir, tiny_teacher):
    env = {"CKD_CACHE_DIR": str(tmp_path / "cache")}
    grid = tiny_grid(glue_dir, tiny_teacher, tmp_path, [1e-4, 3e-4])
    sweep_id = cli("submit", str(grid), "--detach", env=env).stdout.strip().splitlines()[-1]
    sweep = tmp_path / "sweeps" / sweep_id
    deadline = time.monotonic() + 600
    while not list((sweep / "trials").glob("*/job.log")) and time.monotonic() < deadline:
        time.sleep(2)  # a trial is training
    cli("cancel", sweep_id, env=env)
    state = json.loads((sweep / "state.json").read_text())
    assert state["status"] == "cancelled" and not state.get("error")
    from cluster.local import pid_alive

    assert not any(pid_alive(pid) for pid in [state["backend"]["pid"], *state["backend"]["ray_pids"]])  # and its Ray
    assert "cancelled" in cli("status", sweep_id, env=env).stdout

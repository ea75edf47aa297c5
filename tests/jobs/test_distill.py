"""One distillation job end to end on the real stack (DeepSpeed on CPU with gloo, MLflow on SQLite), with
a tiny teacher on slices of the real RTE files. Each job runs in a fresh `ckd-orchestrate run` process."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from jobkit import cli, tiny_job, write_yaml

pytestmark = pytest.mark.slow


def rte_dev(glue_dir: Path, n: int) -> tuple[list[tuple[str, str]], np.ndarray]:
    """The first n RTE dev pairs and gold ids, read straight from the TSV (independent of jobs.data)."""
    with open(glue_dir / "RTE" / "dev.tsv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:n + 1]
    gold = np.array([0 if r[3] == "entailment" else 1 for r in rows])
    return [(r[1], r[2]) for r in rows], gold


def independent_accuracy(student_dir: Path, glue_dir: Path, n: int = 32) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(student_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    pairs, gold = rte_dev(glue_dir, n)
    with torch.no_grad():
        enc = tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation=True, max_length=64,
                        padding=True, return_tensors="pt")
        preds = model(**enc).logits.argmax(-1).numpy()
    return float(accuracy_score(gold, preds))


def job_runs(out: Path) -> tuple[mlflow.MlflowClient, list]:
    """The job's MLflow client (explicit URI: no process-global state between tests) and its runs."""
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ckd-jobs")
    return client, client.search_runs([experiment.experiment_id])


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_single_process_job_exports_a_loadable_student_and_logs_to_mlflow(tmp_path, glue_dir, tiny_teacher):
    out = tmp_path / "run"
    job = write_yaml(tmp_path / "job.yaml", tiny_job(glue_dir, tiny_teacher, out))
    proc = cli("run", str(job), "--set", "training.learning_rate=1e-3", env={"CKD_CACHE_DIR": str(tmp_path / "cache")})
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])

    m = metrics_of(out)
    assert [h["step"] for h in m["history"]] == [4, 8]
    assert m["summary"] == summary
    best = max(m["history"], key=lambda h: h["eval/accuracy"])
    assert summary["best/accuracy"] == best["eval/accuracy"] == m["best"]["eval/accuracy"]
    # The exported student is the best evaluation's model: its accuracy, recomputed from the raw TSV with
    # the Hugging Face tokenizer and sklearn, is the reported one.
    assert independent_accuracy(out / "student", glue_dir) == pytest.approx(summary["best/accuracy"])
    config = json.loads((out / "student" / "config.json").read_text())
    assert config["id2label"] == {"0": "entailment", "1": "not_entailment"}
    assert config["num_hidden_layers"] == 2
    assert summary["student/parameters"] == sum(
        p.numel() for p in AutoModelForSequenceClassification.from_pretrained(out / "student").parameters())
    assert summary["student/latency_ms"] > 0

    client, runs = job_runs(out)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["training.learning_rate"] == "0.001"
    assert run.data.params["objective_terms.wr_angle.window"] == "21"
    history = client.get_metric_history(run.info.run_id, "eval/accuracy")
    assert [(h.step, h.value) for h in history] == [(h["step"], h["eval/accuracy"]) for h in m["history"]]
    for term in ("ce", "logit_kd", "wr_pair", "wr_angle", "ltr_pair", "ltr_angle"):
        assert f"train/{term}" in run.data.metrics
    assert run.data.metrics["best/accuracy"] == summary["best/accuracy"]
    assert "ckd.git_commit" in run.data.tags
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [lm.source_run_id for lm in models] == [run.info.run_id]


def test_killed_job_resumes_to_the_same_metrics_as_an_uninterrupted_one(tmp_path, glue_dir, tiny_teacher):
    env = {"CKD_CACHE_DIR": str(tmp_path / "cache")}
    settings = {"training": {"eval_every_steps": 3, "max_steps": 9, "batch_size": 8}}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    job_a = write_yaml(tmp_path / "a.yaml", tiny_job(glue_dir, tiny_teacher, straight, **settings))
    job_b = write_yaml(tmp_path / "b.yaml", tiny_job(glue_dir, tiny_teacher, resumed, **settings))
    cli("run", str(job_a), env=env)

    killed = cli("run", str(job_b), env={**env, "CKD_TEST_KILL_AT_STEP": "6"}, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL right after the step-6 checkpoint
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    assert "summary" not in metrics_of(resumed)

    proc = cli("run", str(job_b), env=env)
    assert "resumed from step 6" in proc.stdout + proc.stderr
    a, b = metrics_of(straight), metrics_of(resumed)
    assert [h["step"] for h in b["history"]] == [3, 6, 8, 9]  # every 3 steps, and the epoch end (8 batches)
    assert b["history"] == a["history"]  # identical evaluations, bit for bit
    for key in ("best/accuracy", "best/loss", "best/step"):
        assert b["summary"][key] == a["summary"][key]
    # One MLflow run, continued rather than duplicated.
    assert len(job_runs(resumed)[1]) == 1

    again = cli("run", str(job_b), env=env)  # a finished job is not trained again
    assert "already finished" in again.stdout + again.stderr


def test_zero2_with_two_gloo_processes(tmp_path, glue_dir, tiny_teacher):
    out = tmp_path / "zero2"
    job = write_yaml(tmp_path / "job.yaml", tiny_job(glue_dir, tiny_teacher, out,
                                                      deepspeed={"zero_stage": 2}))
    cli("run", str(job), "--nproc", "2", env={"CKD_CACHE_DIR": str(tmp_path / "cache")})
    m = metrics_of(out)
    assert [h["step"] for h in m["history"]] == [4, 8]
    ckpt = out / "checkpoints" / "step-00000008"
    assert sorted(p.name for p in ckpt.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    # Evaluation is sharded over the two ranks and de-duplicated: it covers the 32 dev rows exactly once.
    assert independent_accuracy(out / "student", glue_dir) == pytest.approx(m["summary"]["best/accuracy"])


@pytest.mark.parametrize("override, key", [
    ("training.batch_sise=8", "training.batch_sise"),
    ("student.from_teacher.layers=[0,9]", "student.from_teacher.layers"),
    ("objective.terms.wr_angle.window=-3", "objective.terms.wr_angle.window"),
    ("deepspeed.zero_stage=5", "deepspeed.zero_stage"),
])
def test_bad_specs_fail_before_anything_loads(tmp_path, glue_dir, tiny_teacher, override, key):
    out = tmp_path / "never"
    job = write_yaml(tmp_path / "job.yaml", tiny_job(glue_dir, tiny_teacher, out))
    proc = cli("run", str(job), "--set", override, check=False, timeout=120)
    assert proc.returncode == 2
    assert f"{job}" in proc.stderr and key in proc.stderr
    assert not out.exists()


def test_batch_that_does_not_split_over_processes_is_refused(tmp_path, glue_dir, tiny_teacher):
    job = write_yaml(tmp_path / "job.yaml", tiny_job(glue_dir, tiny_teacher, tmp_path / "never",
                                                      training={"batch_size": 6, "grad_accumulation": 2}))
    proc = cli("run", str(job), "--nproc", "2", check=False, timeout=120)
    assert proc.returncode == 2 and "training.batch_size" in proc.stderr and "multiple of 4" in proc.stderr

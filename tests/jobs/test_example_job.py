"""examples/jobs/minilm_rte_ckd.yaml through `ckd-orchestrate run`, as a user runs it, shortened with --set:
the packaged MiniLM teacher fine-tuned on RTE, then a 2-layer CKD student, exported and logged to MLflow."""

from __future__ import annotations

import json

import mlflow
import pytest
from transformers import AutoModelForSequenceClassification

from jobkit import GLUE_DIR, REPO, cli

pytestmark = pytest.mark.slow


def test_the_example_job_runs_from_the_cli(tmp_path):
    out = tmp_path / "run"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    short = ["teacher.finetune.max_steps=4", "training.max_steps=6", "task.max_train_examples=96",
             "task.max_eval_examples=48", "training.batch_size=16", "teacher.finetune.batch_size=16"]
    args = ["run", str(REPO / "examples" / "jobs" / "minilm_rte_ckd.yaml"), "--set", f"task.glue_dir={GLUE_DIR}",
            "--set", f"output.dir={out}"]
    for override in short:
        args += ["--set", override]
    proc = cli(*args, env={"CKD_CACHE_DIR": str(tmp_path / "cache"), "MLFLOW_TRACKING_URI": store}, timeout=1200)

    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert 0.0 <= summary["best/accuracy"] <= 1.0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["best/accuracy"] == summary["best/accuracy"]
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2 and student.config.id2label == {0: "entailment", 1: "not_entailment"}
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("ckd-jobs").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["task.glue"] == "rte"
    assert run.data.metrics["best/accuracy"] == pytest.approx(summary["best/accuracy"])
    assert {"train/wr_angle", "train/ltr_pair", "train/logit_kd"} <= set(run.data.metrics)

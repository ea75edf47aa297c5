"""jobs.tracking against a real MLflow SQLite store in tmp_path and a real tiny BERT student (no mocks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForSequenceClassification, BertConfig, BertTokenizer

from jobs.models import export_student
from jobs.tracking import (
    MAX_PARAMS_PER_BATCH,
    ParamConflictError,
    default_artifact_location,
    ensure_experiment,
    finish_run,
    git_commit,
    log_metrics_at,
    log_params_batched,
    log_student,
    resolve_tracking_uri,
    start_or_resume_run,
)

LABELS = ["neg", "pos"]


def tiny_student(tmp_path, seed=0, layers=2):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(45)]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    return export_student(model, tokenizer, tmp_path / f"student-{seed}", LABELS)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite tracking store (one per module: creating the schema takes seconds), set as MLflow's
    tracking URI while this module runs. Tests use their own experiment names."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # also exports MLFLOW_TRACKING_URI
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)
    if before is not None:
        os.environ["MLFLOW_TRACKING_URI"] = before


def test_resolve_tracking_uri_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = tmp_path / "deep" / "dir" / "mlflow.db"
    uri = resolve_tracking_uri(None, default)
    assert uri == f"sqlite:///{default.resolve()}" and uri.startswith("sqlite:////")
    assert default.parent.is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, default) == "http://127.0.0.1:5000"
    explicit = f"sqlite:///{tmp_path / 'other' / 'x.db'}"
    assert resolve_tracking_uri(explicit, default) == explicit
    assert (tmp_path / "other").is_dir()
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("rel/store.db", default) == f"sqlite:///{tmp_path / 'rel' / 'store.db'}"


_OPEN_STORE = """
import sys
from mlflow import MlflowClient
from jobs.tracking import ensure_experiment, prepare_store

uri = sys.argv[1]
prepare_store(uri)
experiment = ensure_experiment("together", client=MlflowClient(uri))
run = MlflowClient(uri).create_run(experiment)
print(run.info.run_id)
"""


def test_fresh_sqlite_store_opened_by_several_processes_at_once(tmp_path):
    # without the lock MLflow's table creation races: "duplicate column name: step" and the like
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_STORE, uri], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    for code, out, err in results:
        assert code == 0, err[-3000:]
    run_ids = {out.strip() for _, out, _ in results}
    assert len(run_ids) == 3
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("together")
    assert {r.info.run_id for r in client.search_runs([experiment.experiment_id])} == run_ids
    assert (tmp_path / ".mlflow.db.lock").is_file()


def test_git_commit(tmp_path):
    assert git_commit(tmp_path) is None  # not a work tree
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    assert git_commit(repo) is None  # no commit yet
    (repo / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_commit(repo) == head
    (repo / "untracked.txt").write_text("x")
    assert git_commit(repo) == head  # untracked files do not make it dirty
    (repo / "a.txt").write_text("2")
    assert git_commit(repo) == head + "+dirty"
    assert git_commit(repo / "..") is None


def test_start_or_resume_run_continues_the_same_run(store, tmp_path):
    id_file = tmp_path / "job" / "mlflow_run_id"
    tags = {"ckd.role": "trial", "ckd.trial_id": "t0"}
    run_id = start_or_resume_run("exp-a", "trial-0", tags, id_file)
    assert id_file.read_text().strip() == run_id
    run = store.get_run(run_id)
    assert run.info.run_name == "trial-0" and run.info.status == "RUNNING"
    assert run.data.tags["ckd.trial_id"] == "t0"
    assert store.get_experiment(run.info.experiment_id).name == "exp-a"

    finish_run(run_id, "FAILED")  # the job died; it is started again
    assert store.get_run(run_id).info.status == "FAILED"
    again = start_or_resume_run("exp-a", "trial-0", {**tags, "ckd.attempt": "2"}, id_file)
    assert again == run_id
    run = store.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags["ckd.attempt"] == "2"
    assert len(store.search_runs([run.info.experiment_id])) == 1

    store.delete_run(run_id)  # a deleted run is not resurrected: a new one is made and recorded
    fresh = start_or_resume_run("exp-a", "trial-0", tags, id_file)
    assert fresh != run_id and id_file.read_text().strip() == fresh
    assert not list(id_file.parent.glob(".*tmp"))  # no leftovers of the atomic write


def test_child_run_tags(store, tmp_path):
    parent = start_or_resume_run("exp-b", "sweep", {"ckd.role": "sweep"}, tmp_path / "parent_id")
    child = start_or_resume_run("exp-b", "t1", {"mlflow.parentRunId": parent}, tmp_path / "child_id")
    found = store.search_runs([store.get_run(parent).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.info.run_id for r in found] == [child]


def test_log_params_batched_resume_and_conflict(store, tmp_path):
    run_id = start_or_resume_run("exp-c", "p", {}, tmp_path / "id")
    params = {f"group.key_{i:03d}": i for i in range(2 * MAX_PARAMS_PER_BATCH + 37)}
    assert log_params_batched(None, run_id, params) == len(params)
    logged = store.get_run(run_id).data.params
    assert logged == {k: str(v) for k, v in params.items()}
    # A resumed job logs the same params again: nothing new, no error.
    assert log_params_batched(store, run_id, {**params, "extra": "x"}) == 1
    with pytest.raises(ParamConflictError, match="group.key_007") as err:
        log_params_batched(store, run_id, {"group.key_006": 6, "group.key_007": "changed"})
    assert err.value.key == "group.key_007" and err.value.old == "7" and err.value.new == "changed"
    assert store.get_run(run_id).data.params["group.key_007"] == "7"


def test_log_metrics_at(store, tmp_path):
    run_id = start_or_resume_run("exp-d", "m", {}, tmp_path / "id")
    log_metrics_at(run_id, {"eval/accuracy": 0.5, "train/loss": 2.0}, step=10)
    log_metrics_at(run_id, {"eval/accuracy": 0.75, "train/loss": 1.5}, step=20, client=store)
    history = store.get_metric_history(run_id, "eval/accuracy")
    assert [(m.step, m.value) for m in history] == [(10, 0.5), (20, 0.75)]
    assert store.get_run(run_id).data.metrics["train/loss"] == 1.5


def test_log_student_is_a_logged_model_of_the_run(store, tmp_path):
    export = tiny_student(tmp_path)
    run_id = start_or_resume_run("exp-e", "s", {}, tmp_path / "id")
    log_metrics_at(run_id, {"best/accuracy": 0.9}, step=7)
    uri = log_student(run_id, export, step=7)
    assert uri.startswith("models:/m-")
    model = store.get_logged_model(uri.removeprefix("models:/"))
    assert model.name == "student" and model.source_run_id == run_id and str(model.status) == "READY"
    assert model.experiment_id == store.get_run(run_id).info.experiment_id  # not the "Default" experiment
    # Artifacts live beside the database, not in ./mlruns of the working directory.
    beside_db = (Path(store.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts" / "exp-e").as_uri()
    assert model.artifact_location.startswith(beside_db + "/")
    assert store.get_run(run_id).info.artifact_uri.startswith(beside_db + "/")
    assert [o.model_id for o in store.get_run(run_id).outputs.model_outputs] == [model.model_id]
    assert {m.key: m.value for m in model.metrics or []} == {"best/accuracy": 0.9}  # linked at step 7
    # Registrable as is (the MLflow 3 LoggedModel URI).
    version = mlflow.register_model(uri, "tiny-student")
    assert version.version in (1, "1") and version.run_id == run_id
    # The flavour loads it back, offline, as a pipeline that predicts our labels.
    pipe = mlflow.transformers.load_model(uri)
    assert pipe("w1 w2 w3")[0]["label"] in LABELS
    assert os.environ.get("MLFLOW_TRACKING_URI", "").startswith("sqlite:")


def test_experiment_artifacts_beside_the_database(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    experiment_id = ensure_experiment("exp f/with space")
    assert ensure_experiment("exp f/with space", client=store) == experiment_id
    location = store.get_experiment(experiment_id).artifact_location
    db_dir = Path(store.tracking_uri.removeprefix("sqlite:///")).parent
    assert location == (db_dir / "mlartifacts" / "exp_f_with_space").as_uri()
    assert default_artifact_location("http://127.0.0.1:5000", "x") is None
    run_id = start_or_resume_run("exp f/with space", "r", {}, tmp_path / "id")
    store.log_text(run_id, "hello", "notes/a.txt")
    assert (db_dir / "mlartifacts" / "exp_f_with_space" / run_id / "artifacts" / "notes" / "a.txt").is_file()
    assert not (tmp_path / "mlruns").exists()

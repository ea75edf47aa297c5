"""orchestrator.registry and orchestrator.report on a real MLflow SQLite store: a sweep's parent run with
three trial child runs (tiny BERT students logged as transformers-flavour models) and one unfinished
trial; champion registration, alias, lineage tags, idempotence, pull, and the front report. No mocks."""

from __future__ import annotations

import csv
import os
from types import SimpleNamespace

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertTokenizer

from jobs.models import count_parameters, export_student
from jobs.tracking import log_metrics_at, log_params_batched, log_student, start_or_resume_run
from orchestrator.registry import ChampionError, PullError, best_trial_run, pull, register_champion
from orchestrator.report import front_report, pareto_front, trials_table

LABELS = ["neg", "neu", "pos"]
MODEL = "ckd-students"
# name -> (hidden layers, best/accuracy, latency_ms); "b" is the champion, "c" is cheaper than "b".
TRIALS = {"a": (1, 0.60, 1.0), "b": (3, 0.80, 3.0), "c": (2, 0.70, 2.0)}


def tiny_tokenizer() -> BertTokenizer:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(55)]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})


def tiny_student(layers: int, seed: int):
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=len(LABELS))
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval()


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["w1 w2 w3", "w7 w8"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The MLflow layout of a finished sweep (docs/architecture.md, "MLflow layout"), in a module-wide SQLite store."""
    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # log_student (MLflow's log_model) uses the global URI
    parent = start_or_resume_run("grid", "sweep-s1", {"ckd.sweep_id": "s1", "ckd.role": "sweep"},
                                 root / "parent_run_id")
    children, exports = {}, {}
    for i, (name, (layers, acc, latency)) in enumerate(TRIALS.items()):
        run_id = start_or_resume_run("grid", f"trial-{name}", {
            "mlflow.parentRunId": parent, "ckd.sweep_id": "s1", "ckd.trial_id": f"t{i}", "ckd.role": "trial",
        }, root / name / "run_id")
        log_params_batched(None, run_id, {"teacher.source": "package:all-MiniLM-L6-v2",
                                          "trial.student.architecture.num_layers": layers})
        for step, frac in ((10, 0.8), (20, 1.0)):
            log_metrics_at(run_id, {"eval/accuracy": acc * frac, "train/loss": 1 / step}, step=step)
        model = tiny_student(layers, seed=i)
        exports[name] = export_student(model, tiny_tokenizer(), root / name / "student", LABELS)
        log_metrics_at(run_id, {"best/accuracy": acc, "student/parameters": count_parameters(model),
                                "student/latency_ms": latency, "student/latency_p90_ms": latency * 1.2}, step=20)
        log_student(run_id, exports[name], step=20)
        children[name] = run_id
    # A trial still running: eval metrics but no best/ metric and no model; it must be skipped.
    running = start_or_resume_run("grid", "trial-d", {"mlflow.parentRunId": parent, "ckd.sweep_id": "s1",
                                                      "ckd.trial_id": "t3"}, root / "d" / "run_id")
    log_metrics_at(running, {"eval/accuracy": 0.99}, step=10)
    # A run outside the sweep with a better metric must not be considered.
    outsider = start_or_resume_run("grid", "other", {"mlflow.parentRunId": "another-parent"}, root / "o" / "id")
    log_metrics_at(outsider, {"best/accuracy": 1.0}, step=1)
    yield SimpleNamespace(uri=uri, root=root, parent=parent, children=children, running=running,
                          exports=exports, client=MlflowClient(uri))
    mlflow.set_tracking_uri(None)
    if before is not None:
        os.environ["MLFLOW_TRACKING_URI"] = before


def test_best_trial_run_ranks_children_by_best_metric(sweep):
    best = best_trial_run("grid", sweep.parent, "eval/accuracy", "max")
    assert best.info.run_id == sweep.children["b"]
    worst = best_trial_run(None, sweep.parent, "eval/accuracy", "min", tracking_uri=sweep.uri)
    assert worst.info.run_id == sweep.children["a"]
    experiment_id = sweep.client.get_run(sweep.parent).info.experiment_id
    assert best_trial_run(experiment_id, sweep.parent, "accuracy", "max").info.run_id == sweep.children["b"]
    with pytest.raises(ChampionError, match=r"best/f1.*best/accuracy"):
        best_trial_run("grid", sweep.parent, "eval/f1", "max")
    with pytest.raises(ChampionError, match="no child runs"):
        best_trial_run("grid", sweep.children["a"], "eval/accuracy", "max")
    with pytest.raises(ValueError, match="mode"):
        best_trial_run("grid", sweep.parent, "eval/accuracy", "highest")


def test_register_champion_tags_alias_and_idempotence(sweep):
    version = register_champion(sweep.parent, "eval/accuracy", "max", MODEL, extra_tags={"ckd.grid": "g.yaml"})
    best = sweep.children["b"]
    assert version.run_id == best and version.aliases == ["champion"]
    tags = version.tags
    assert tags["ckd.sweep_id"] == "s1" and tags["ckd.trial_id"] == "t1"
    assert tags["ckd.parent_run_id"] == sweep.parent and tags["ckd.run_id"] == best
    assert tags["ckd.metric"] == "eval/accuracy" and float(tags["ckd.metric_value"]) == 0.80
    assert tags["ckd.teacher"] == "package:all-MiniLM-L6-v2" and tags["ckd.grid"] == "g.yaml"
    model = sweep.client.get_logged_model(tags["ckd.model_id"])
    assert model.source_run_id == best and model.name == "student"
    assert sweep.client.get_model_version_by_alias(MODEL, "champion").version == version.version
    parent_tags = sweep.client.get_run(sweep.parent).data.tags
    assert parent_tags["ckd.champion_version"] == str(version.version)
    assert parent_tags["ckd.champion_run_id"] == best and parent_tags["ckd.champion_model"] == MODEL

    again = register_champion(sweep.parent, "eval/accuracy", "max", MODEL, extra_tags={"ckd.grid": "g.yaml"})
    assert again.version == version.version
    assert len(sweep.client.search_model_versions(f"name = '{MODEL}'")) == 1

    # Another alias on the same version is not a new version either; a different champion is.
    register_champion(sweep.parent, "eval/accuracy", "max", MODEL, alias="latest-sweep")
    cheapest = register_champion(sweep.parent, "eval/accuracy", "min", MODEL, alias="worst")
    assert cheapest.run_id == sweep.children["a"] and int(cheapest.version) == int(version.version) + 1
    aliases = sweep.client.get_registered_model(MODEL).aliases
    assert aliases == {"champion": version.version, "latest-sweep": version.version, "worst": cheapest.version}


def test_pull_gives_a_loadable_hugging_face_directory(sweep, tmp_path):
    register_champion(sweep.parent, "eval/accuracy", "max", MODEL)
    dest = pull(f"models:/{MODEL}@champion", tmp_path / "champion")
    assert dest == (tmp_path / "champion").resolve()
    names = {p.name for p in dest.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= names
    assert "MLmodel" not in names and not list(tmp_path.glob(".*pull*"))  # unwrapped, no leftovers
    model = AutoModelForSequenceClassification.from_pretrained(dest).eval()
    tokenizer = AutoTokenizer.from_pretrained(dest)
    assert model.config.id2label == dict(enumerate(LABELS))
    exported = AutoModelForSequenceClassification.from_pretrained(sweep.exports["b"]).eval()
    expected = logits(exported, AutoTokenizer.from_pretrained(sweep.exports["b"]))
    torch.testing.assert_close(logits(model, tokenizer), expected, rtol=0, atol=0)

    # By version, by LoggedModel id, and by runs:/ URI; an existing empty directory is fine.
    (tmp_path / "empty").mkdir()
    version = sweep.client.get_model_version_by_alias(MODEL, "champion")
    for uri, where in ((f"models:/{MODEL}/{version.version}", "empty"),
                       (f"models:/{version.tags['ckd.model_id']}", "by-id"),
                       (f"runs:/{sweep.children['c']}/student", "run-c")):
        out = pull(uri, tmp_path / where)
        assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    c = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run-c").eval()
    assert c.config.num_hidden_layers == TRIALS["c"][0]


def test_pull_errors_name_what_exists(sweep, tmp_path):
    register_champion(sweep.parent, "eval/accuracy", "max", MODEL)
    with pytest.raises(PullError, match=rf"no registered model named 'nope'.*{MODEL}"):
        pull("models:/nope@champion", tmp_path / "x")
    with pytest.raises(PullError, match=r"no alias 'gold'.*@champion"):
        pull(f"models:/{MODEL}@gold", tmp_path / "x")
    with pytest.raises(PullError, match=r"no version '99'.*versions: \[1"):
        pull(f"models:/{MODEL}/99", tmp_path / "x")
    with pytest.raises(PullError, match="names no version"):
        pull(f"models:/{MODEL}", tmp_path / "x")
    with pytest.raises(PullError, match="unsupported model URI"):
        pull("s3://bucket/model", tmp_path / "x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        pull(f"models:/{MODEL}@champion", busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "x").exists()


def test_trials_table(sweep):
    rows = {r["run_name"]: r for r in trials_table(sweep.parent, "eval/accuracy")}
    assert set(rows) == {"trial-a", "trial-b", "trial-c", "trial-d"}
    b = rows["trial-b"]
    assert b["run_id"] == sweep.children["b"] and b["trial_id"] == "t1" and b["status"] == "RUNNING"
    assert b["metric"] == 0.80 and b["latency_ms"] == 3.0 and b["parameters"] > rows["trial-a"]["parameters"]
    assert b["params"] == {"student.architecture.num_layers": "3"}
    assert rows["trial-d"]["metric"] is None and rows["trial-d"]["last_eval"] == 0.99


def test_pareto_front():
    # (cost, metric): (2, 0.5) is dominated by (1, 0.6); ties on both keep both.
    assert pareto_front([(1, 0.6), (2, 0.5), (3, 0.9), (3, 0.9), (4, 0.8)]) == [True, False, True, True, False]


def test_front_report_writes_and_logs_png_and_csv(sweep, tmp_path):
    png = front_report(sweep.parent, "eval/accuracy", tmp_path / "out" / "front.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with open(png.with_suffix(".csv")) as handle:
        rows = {r["run_name"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"trial-a", "trial-b", "trial-c", "trial-d"}
    # More parameters and more latency buy accuracy here: every finished trial is on both fronts.
    for name in ("trial-a", "trial-b", "trial-c"):
        assert rows[name]["pareto_size"] == "True" and rows[name]["pareto_latency"] == "True"
    assert rows["trial-d"]["pareto_size"] == "False" and rows["trial-d"]["metric"] == ""
    logged = {a.path for a in sweep.client.list_artifacts(sweep.parent, "report")}
    assert logged == {"report/front.png", "report/front.csv"}
    artifact_uri = sweep.client.get_run(sweep.parent).info.artifact_uri  # beside the database
    assert artifact_uri.startswith((sweep.root.resolve() / "mlartifacts").as_uri() + "/")

"""jobs.spec (with jobs.taskspec and jobs.deepspeed_config): strict job specs from real YAML files, with
file:line: key errors, overrides, DeepSpeed config generation, the teacher cache key and MLflow params.
No model or data is loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from jobkit import GLUE_DIR, edit, line_of
from jobs.glue import find_task_dir, match_task_dir
from jobs.spec import JobSpec, load_job_spec
from jobs.specbase import SpecError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "jobs" / "minilm_rte_ckd.yaml"

GOOD = """\
task:
  glue: rte
  glue_dir: glue
  max_train_examples: 200
teacher:
  source: package:all-MiniLM-L6-v2
  finetune:
    epochs: 1
    learning_rate: 3e-5
student:
  from_teacher:
    layers: [0, 5]
objective:
  preset: ckd-paper
  terms:
    wr_angle: {window: 11}
training:
  batch_size: 16
  grad_accumulation: 2
  learning_rate: 5e-5
deepspeed:
  zero_stage: 2
  precision: bf16
  config:
    steps_per_print: 50
    zero_optimization:
      overlap_comm: true
output:
  dir: out
"""


def fake_glue(root: Path) -> Path:
    (root / "glue" / "RTE").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (root / "glue" / "RTE" / name).write_text("index\tsentence1\tsentence2\tlabel\n")
    return root / "glue"


@pytest.fixture
def job_dir(tmp_path):
    fake_glue(tmp_path)
    return tmp_path


def write(directory: Path, text: str, name: str = "job.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def spec_error(path: Path, overrides=()) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_job_spec(path, overrides, env={})
    return info.value


def assert_issue(err: SpecError, path: Path, key: str, line: int | None, *fragments: str) -> str:
    """The error has a line for `key` naming the file, the line and every fragment; returns it."""
    prefix = f"{path}:{line}: {key}: " if line else f"{path}: {key}: "
    matches = [m for m in str(err).splitlines() if m.startswith(prefix)]
    assert matches, f"no line starting {prefix!r} in:\n{err}"
    for fragment in fragments:
        assert fragment in matches[0], f"{fragment!r} not in {matches[0]!r}"
    return matches[0]


# ------------------------------------------------------------------------------------------ good specs


def test_good_spec_resolves_and_round_trips(job_dir):
    path = write(job_dir, GOOD)
    spec = load_job_spec(path, env={})
    assert spec.task.glue == "rte" and spec.task.glue_dir == job_dir / "glue"
    assert spec.output.dir == job_dir / "out"
    assert spec.teacher.finetune.learning_rate == 3e-5  # YAML 1.2 float, not the string "3e-5"
    assert spec.student.mode == "from_teacher" and spec.student.from_teacher.layers == [0, 5]
    assert spec.objective == {"preset": "ckd-paper", "terms": {"wr_angle": {"window": 11}}, "task": "rte"}
    assert spec.resolved_objective()["wr_angle"]["window"] == 11
    assert spec.training.epochs == 3 and spec.training.eval_batch_size == 64  # defaults
    assert spec.output.mlflow.tracking_uri == f"sqlite:///{job_dir / 'out' / 'mlflow.db'}"
    assert spec.task.task_info().label_names == ("entailment", "not_entailment")

    # The resolved spec (absolute paths) written elsewhere reads back identically.
    other = job_dir / "elsewhere"
    other.mkdir()
    copy = write(other, yaml.safe_dump(spec.to_dict()), "resolved.yaml")
    assert load_job_spec(copy, env={}).to_dict() == spec.to_dict()
    assert JobSpec.from_mapping(spec.to_dict()).to_dict() == spec.to_dict()


def test_tracking_uri_from_env_at_the_edge(job_dir):
    path = write(job_dir, GOOD)
    assert load_job_spec(path, env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"}).output.mlflow.tracking_uri == (
        "http://mlflow:5000")
    explicit = edit(GOOD, "  dir: out\n", "  dir: out\n  mlflow: {tracking_uri: 'sqlite:///x.db'}\n")
    path = write(job_dir, explicit)
    assert load_job_spec(path, env={"MLFLOW_TRACKING_URI": "http://m"}).output.mlflow.tracking_uri == "sqlite:///x.db"


def test_dataset_task_with_local_files(job_dir):
    (job_dir / "data").mkdir()
    (job_dir / "data" / "train.csv").write_text("text,label\na,pos\n")
    (job_dir / "data" / "dev.jsonl").write_text('{"text": "b", "label": "neg"}\n')
    text = edit(GOOD, "  glue: rte\n  glue_dir: glue\n", """\
  dataset:
    files: {train: data/train.csv, validation: data/dev.jsonl}
  name: reviews
  text_fields: [text]
  label_names: [neg, pos]
  metric: f1
""")
    text = edit(text, "  preset: ckd-paper\n  terms:\n    wr_angle: {window: 11}\n",
                "  terms:\n    ce: {weight: 1}\n    logit_kd: {temperature: 2}\n")
    spec = load_job_spec(write(job_dir, text), env={})
    assert spec.task.dataset.files["train"] == job_dir / "data" / "train.csv"
    info = spec.task.task_info()
    assert info.name == "reviews" and info.metric_kind == "f1" and info.dev_splits == ("validation",)
    assert JobSpec.from_mapping(spec.to_dict()).to_dict() == spec.to_dict()


def test_hub_dataset_shorthand_and_regression(job_dir):
    text = edit(GOOD, "  glue: rte\n  glue_dir: glue\n",
                "  dataset: org/scores\n  text_fields: [a, b]\n  label_field: score\n  regression: true\n")
    text = edit(text, "  preset: ckd-paper\n  terms:\n    wr_angle: {window: 11}\n", "  terms: {logit_kd: {}}\n")
    spec = load_job_spec(write(job_dir, text), env={})
    assert spec.task.dataset.hub == "org/scores" and spec.task.task_info().metric_kind == "pearson_spearman"
    assert JobSpec.from_mapping(spec.to_dict()).to_dict() == spec.to_dict()


def test_example_file_loads():
    spec = load_job_spec(EXAMPLE, env={})
    assert spec.task.glue == "rte" and spec.task.glue_dir.name == "glue" and spec.task.glue_dir.is_dir()
    assert spec.teacher.source == "package:all-MiniLM-L6-v2" and spec.teacher.finetune is not None
    assert spec.student.from_teacher.layers == [0, 5]
    assert spec.objective["preset"] == "ckd-paper" and spec.objective["task"] == "rte"
    assert set(spec.resolved_objective()) == {"ce", "logit_kd", "wr_pair", "wr_angle", "ltr_pair", "ltr_angle"}
    assert spec.deepspeed_config(1)["train_micro_batch_size_per_gpu"] == 32


# ----------------------------------------------------------------------------------------- bad specs


@pytest.mark.parametrize(
    ("old", "new", "key", "needle", "fragments"),
    [
        ("output:\n", "outptu: {}\noutput:\n", "outptu", "outptu:", ("unknown key", "did you mean 'output'", "valid keys here")),
        ("  max_train_examples: 200\n", "  max_train_examples: 200\n  max_len: 64\n", "task.max_len", "max_len:",
         ("unknown key", "max_length")),
        ("    layers: [0, 5]\n", "    layers: [0, 5]\n    copy_head: true\n", "student.from_teacher.copy_head",
         "copy_head", ("unknown key", "copy_classifier")),
        ("    epochs: 1\n", "    epochs: 1\n    lr: 1\n", "teacher.finetune.lr", "lr: 1", ("unknown key", "learning_rate")),
        ("  batch_size: 16\n", "  batch_size: sixteen\n", "training.batch_size", "batch_size: sixteen",
         ("integer", "'sixteen'")),
        ("  precision: bf16\n", "  precision: fp8\n", "deepspeed.precision", "precision: fp8", ("'fp32'", "'fp8'")),
        ("  zero_stage: 2\n", "  zero_stage: 4\n", "deepspeed.zero_stage", "zero_stage: 4", ("less than or equal to 3",)),
        ("  glue: rte\n", "  glue: rtee\n", "task.glue", "glue: rtee", ("unknown GLUE task 'rtee'", "known tasks")),
        ("  glue_dir: glue\n", "  glue_dir: no/such/dir\n", "task.glue_dir", "glue_dir:", ("does not exist",)),
        ("    layers: [0, 5]\n", "    layers: [3, 1]\n", "student.from_teacher.layers", "layers:",
         ("strictly increasing", "[3, 1]")),
        ("    layers: [0, 5]\n", "    layers: [0, 6]\n", "student.from_teacher.layers", "layers:",
         ("out of range", "6-layer teacher")),
        ("    layers: [0, 5]\n", "    layers: [-1, 2]\n", "student.from_teacher.layers", "layers:", ("non-negative",)),
        ("    layers: [0, 5]\n", "    layers: []\n", "student.from_teacher.layers", "layers:", ("at least 1",)),
        ("    layers: [0, 5]\n", "    layers: [0, 5]\n  pretrained: package:all-MiniLM-L6-v2\n", "student",
         "student:", ("exactly one of", "from_teacher and pretrained")),
        ("  from_teacher:\n    layers: [0, 5]\n",
         "  architecture: {num_layers: 2, hidden_size: 100, num_heads: 12, intermediate_size: 64}\n",
         "student.architecture.hidden_size", "architecture:", ("divisible by num_heads (12)",)),
        ("    wr_angle: {window: 11}\n", "    wr_angle: {window: 11, windw: 3}\n", "objective.terms.wr_angle.windw",
         "wr_angle:", ("unknown option",)),
        ("    wr_angle: {window: 11}\n", "    wr_angel: {window: 11}\n", "objective.terms.wr_angel", "wr_angel:",
         ("unknown loss term",)),
        ("  preset: ckd-paper\n", "  preset: ckd-paper\n  task: boolq\n", "objective.task", "task: boolq",
         ("ckd-paper preset",)),
        ("  source: package:all-MiniLM-L6-v2\n", "  source: package:nope\n", "teacher.source", "source: package",
         ("unknown packaged model 'nope'",)),
        ("  source: package:all-MiniLM-L6-v2\n", "  source: ./teacher_dir\n", "teacher.source", "source: ./",
         ("does not exist",)),
        ("      overlap_comm: true\n", "      overlap_comm: true\n      stage: 3\n",
         "deepspeed.config.zero_optimization.stage", "stage: 3", ("3", "2", "deepspeed.zero_stage")),
        ("    steps_per_print: 50\n", "    steps_per_print: 50\n    optimizer: {type: Adam}\n",
         "deepspeed.config.optimizer", "optimizer:", ("not allowed",)),
        ("  grad_accumulation: 2\n", "  grad_accumulation: 3\n", "training.batch_size", "batch_size: 16",
         ("not divisible by grad_accumulation 3",)),
        ("  glue_dir: glue\n", "  glue_dir: glue\n  text_fields: [a]\n", "task.text_fields", "text_fields:",
         ("only for a dataset task",)),
        ("output:\n  dir: out\n", "output:\n  mlflow: {experiment: x}\n", "output.dir", "output:", ("required",)),
    ],
)
def test_bad_spec_names_file_key_and_line(job_dir, old, new, key, needle, fragments):
    text = edit(GOOD, old, new)
    path = write(job_dir, text)
    err = spec_error(path)
    assert_issue(err, path, key, line_of(text, needle), *fragments)


def test_all_errors_reported_together(job_dir):
    text = edit(GOOD, "  batch_size: 16\n", "  batch_size: -1\n  bogus: 1\n")
    text = edit(text, "  precision: bf16\n", "  precision: fp8\n")
    text = edit(text, "    wr_angle: {window: 11}\n", "    wr_angle: {window: 0.5}\n")
    path = write(job_dir, text)
    err = spec_error(path)
    assert len(err.issues) == 4, str(err)
    assert_issue(err, path, "training.batch_size", line_of(text, "batch_size: -1"), "greater than or equal to 1", "-1")
    assert_issue(err, path, "training.bogus", line_of(text, "bogus"), "unknown key")
    assert_issue(err, path, "deepspeed.precision", line_of(text, "precision: fp8"))
    assert_issue(err, path, "objective.terms.wr_angle.window", line_of(text, "wr_angle:"), "0.5")
    assert len(str(err).splitlines()) == 4


def test_objective_checked_against_glue_task_even_when_task_section_fails(job_dir):
    text = edit(GOOD, "  glue_dir: glue\n", "  glue_dir: missing\n")
    text = edit(text, "    wr_angle: {window: 11}\n", "    wr_angle: {window: 0.5}\n")
    path = write(job_dir, text)
    err = spec_error(path)
    assert [i.key for i in err.issues] == ["task.glue_dir", "objective.terms.wr_angle.window"], str(err)


def test_missing_sections_and_conflicting_modes(job_dir):
    path = write(job_dir, "task: {glue: sst2}\nstudent: {}\n")
    err = spec_error(path)
    for key in ("teacher", "objective", "output"):
        assert_issue(err, path, key, None, "required key is missing")
    assert_issue(err, path, "student", 2, "exactly one of", "got none")


def test_yaml_syntax_error_has_line(job_dir):
    path = write(job_dir, "task:\n  glue: rte\n  bad: [1, 2\nteacher: {}\n")
    err = spec_error(path)
    assert str(err).startswith(f"{path}:") and "YAML syntax error" in str(err)
    assert err.issues[0].line is not None and err.issues[0].line >= 3


def test_duplicate_yaml_key_is_an_error(job_dir):
    text = edit(GOOD, "  batch_size: 16\n", "  batch_size: 16\n  batch_size: 8\n")
    path = write(job_dir, text)
    err = spec_error(path)
    assert f"{path}:{line_of(text, 'batch_size: 8')}:" in str(err) and "duplicate key 'batch_size'" in str(err)


def test_missing_file_and_non_mapping(tmp_path):
    err = spec_error(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(err) and "not found" in str(err)
    path = write(tmp_path, "- a\n- b\n")
    assert "expected a mapping" in str(spec_error(path))


def test_local_dataset_file_missing(job_dir):
    text = edit(GOOD, "  glue: rte\n  glue_dir: glue\n",
                "  dataset:\n    files: {train: data/train.csv}\n  text_fields: [text]\n  label_names: [a, b]\n")
    path = write(job_dir, text)
    assert_issue(spec_error(path), path, "task.dataset.files.train", line_of(text, "files:"), "does not exist")


# ----------------------------------------------------------------------------------------- overrides


def test_overrides(job_dir):
    path = write(job_dir, GOOD)
    spec = load_job_spec(path, ["training.learning_rate=3e-5", "student.from_teacher.layers=[1,3,5]",
                                "deepspeed.config.wall_clock_breakdown=true", "output.mlflow.run_name=trial 7"],
                         env={})
    assert spec.training.learning_rate == 3e-5
    assert spec.student.from_teacher.layers == [1, 3, 5]
    assert spec.deepspeed_config(1)["wall_clock_breakdown"] is True
    assert spec.output.mlflow.run_name == "trial 7"


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("training.learning_rate.x=1", "training.learning_rate.x", "training.learning_rate is 5e-05, not a mapping"),
        ("training", "training", "expected dotted.key=value"),
        ("training..seed=1", "training..seed", "expected dotted.key=value"),
        ("training.lr=1e-5", "training.lr", "unknown key"),
        ("training.batch_size=abc", "training.batch_size", "integer"),
    ],
)
def test_bad_overrides(job_dir, override, key, fragment):
    path = write(job_dir, GOOD)
    line = assert_issue(spec_error(path, [override]), path, key, None, fragment)
    if fragment in ("unknown key", "integer"):
        assert f"set by override {override!r}" in line


# ------------------------------------------------------------------------------------------ DeepSpeed


def test_deepspeed_config_merges_raw(job_dir):
    spec = load_job_spec(write(job_dir, GOOD), env={})
    config = spec.deepspeed_config(world_size=2)
    assert config["train_batch_size"] == 16
    assert config["train_micro_batch_size_per_gpu"] == 4  # 16 / (2 processes x 2 accumulation)
    assert config["gradient_accumulation_steps"] == 2 and config["gradient_clipping"] == 1.0
    assert config["zero_optimization"] == {"overlap_comm": True, "stage": 2, "offload_optimizer": {"device": "none"}}
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["steps_per_print"] == 50
    assert "optimizer" not in config and "scheduler" not in config
    assert spec.deepspeed.config["zero_optimization"] == {"overlap_comm": True}  # raw config untouched


def test_deepspeed_micro_batch_must_divide(job_dir):
    path = write(job_dir, GOOD)
    spec = load_job_spec(path, env={})
    with pytest.raises(SpecError) as info:
        spec.deepspeed_config(world_size=3)
    assert_issue(info.value, path, "training.batch_size", line_of(GOOD, "batch_size: 16"), "3 process(es)", "6")


def test_deepspeed_conflicts_collected(job_dir):
    text = edit(GOOD, "    steps_per_print: 50\n",
                "    steps_per_print: 50\n    gradient_clipping: 0.5\n    bf16: {enabled: false}\n"
                "    train_micro_batch_size_per_gpu: 8\n    gradient_accumulation_steps: auto\n")
    path = write(job_dir, text)
    err = spec_error(path)
    assert len(err.issues) == 2, str(err)
    assert_issue(err, path, "deepspeed.config.gradient_clipping", line_of(text, "gradient_clipping"),
                 "0.5", "1.0", "training.grad_clip")
    assert_issue(err, path, "deepspeed.config.bf16.enabled", line_of(text, "bf16:"), "False", "True")
    # The micro batch depends on the world size: checked when the config is built.
    spec = load_job_spec(path, ["deepspeed.config.gradient_clipping=1.0", "deepspeed.precision=fp32"], env={})
    assert spec.deepspeed_config(1)["gradient_accumulation_steps"] == 2  # "auto" defers to the spec
    with pytest.raises(SpecError) as info:
        spec.deepspeed_config(2)
    assert_issue(info.value, path, "deepspeed.config.train_micro_batch_size_per_gpu",
                 line_of(text, "train_micro_batch_size_per_gpu"), "8", "4")


def test_offload_needs_zero(job_dir):
    text = edit(GOOD, "  zero_stage: 2\n", "  zero_stage: 0\n  offload_optimizer: true\n")
    path = write(job_dir, text)
    assert_issue(spec_error(path), path, "deepspeed.offload_optimizer", line_of(text, "offload_optimizer"), "zero_stage")


# ------------------------------------------------------------------------------ cache key, MLflow params


def test_teacher_cache_key(job_dir):
    path = write(job_dir, GOOD)
    key = load_job_spec(path, env={}).teacher_cache_key()
    assert len(key) == 64 and int(key, 16) >= 0
    assert load_job_spec(path, env={}).teacher_cache_key() == key  # stable across loads
    # Things that do not determine the teacher leave the key alone.
    for same in ("training.learning_rate=1e-4", "student.from_teacher.layers=[0,2]", "output.dir=elsewhere",
                 "task.max_eval_examples=10", "teacher.dtype=bf16"):
        assert load_job_spec(path, [same], env={}).teacher_cache_key() == key, same
    # Things that do change it.
    for different in ("teacher.finetune.seed=1", "teacher.finetune.learning_rate=1e-5", "task.max_length=64",
                      "task.max_train_examples=100", "teacher.finetune.max_steps=10", "task.subset_seed=0",
                      "teacher.finetune.max_train_examples=100"):
        assert load_job_spec(path, [different], env={}).teacher_cache_key() != key, different
    # The key follows the rows the teacher trains on: students on fewer rows share the same teacher.
    fewer = load_job_spec(path, ["task.max_train_examples=50", "teacher.finetune.max_train_examples=200"], env={})
    assert fewer.teacher_train_examples() == 200 and fewer.task.max_train_examples == 50
    assert fewer.teacher_cache_key() == key
    # Edited data changes it; the same data in another directory does not.
    other = job_dir / "copy"
    other.mkdir()
    fake_glue(other)
    for name in ("train.tsv", "dev.tsv"):
        src, dst = job_dir / "glue" / "RTE" / name, other / "glue" / "RTE" / name
        dst.write_bytes(src.read_bytes())
        os.utime(dst, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns))
    assert load_job_spec(path, ["task.glue_dir=copy/glue"], env={}).teacher_cache_key() == key
    (other / "glue" / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    assert load_job_spec(path, ["task.glue_dir=copy/glue"], env={}).teacher_cache_key() != key


def sst2_job(glue_dir: Path, out: Path) -> dict:
    return {"task": {"glue": "sst2", "glue_dir": str(glue_dir)}, "teacher": {"source": "package:all-MiniLM-L6-v2"},
            "student": {"from_teacher": {"layers": [0, 5]}}, "objective": {"preset": "ckd-paper"},
            "output": {"dir": str(out)}}


def rewrite_first_row(tsv: Path) -> None:
    """Flip the label of the first data row (same size; the mtime moves on)."""
    lines = tsv.read_text().splitlines(keepends=True)
    text, label = lines[1].rstrip("\n").rsplit("\t", 1)
    lines[1] = f"{text}\t{1 - int(label)}\n"
    mtime = tsv.stat().st_mtime_ns
    tsv.write_text("".join(lines))
    os.utime(tsv, ns=(mtime + 1_000_000_000, mtime + 1_000_000_000))


@pytest.mark.skipif(not (GLUE_DIR / "SST-2").is_dir(), reason=f"real GLUE data not found at {GLUE_DIR}")
@pytest.mark.parametrize("folder", ["SST-2", "SST_2", "sst-2", "sst2"])
def test_teacher_cache_key_follows_the_glue_folder_contents(tmp_path, folder):
    glue = tmp_path / "glue"
    shutil.copytree(GLUE_DIR / "SST-2", glue / folder)
    (glue / "RTE").mkdir()  # another task's folder is never the one matched
    spec = JobSpec.from_mapping(sst2_job(glue, tmp_path / "out"))
    # One matcher for every reader: validation, the reader of the data and the cache key see one folder.
    assert match_task_dir(glue, "sst2") == find_task_dir(glue, "SST-2") == glue / folder
    fingerprint = spec.task.data_identity()["files"]
    assert [name for name, size, _ in fingerprint] == ["dev.tsv", "train.tsv"]
    assert all(size == (glue / folder / name).stat().st_size > 0 for name, size, _ in fingerprint)
    key = spec.teacher_cache_key()
    rewrite_first_row(glue / folder / "train.tsv")
    assert spec.teacher_cache_key() != key


def test_glue_folder_spelling_is_matched_once(tmp_path):
    fake_glue(tmp_path)
    (tmp_path / "glue" / "RTE").rename(tmp_path / "glue" / "r_t-e")
    assert match_task_dir(tmp_path / "glue", "rte") == tmp_path / "glue" / "r_t-e"
    assert match_task_dir(tmp_path / "glue", "sst2") is None
    assert match_task_dir(tmp_path / "nowhere", "rte") is None
    path = write(tmp_path, GOOD)
    assert load_job_spec(path, env={}).task.data_identity()["files"][0][1] > 0  # the folder's dev.tsv, found
    path = write(tmp_path, GOOD.replace("glue: rte", "glue: sst2"))
    assert_issue(spec_error(path), path, "task.glue_dir", line_of(GOOD, "glue_dir:"), "no SST-2/ folder")


def test_config_leaves_stay_light():
    # Config validation, `plan` and the sweep's state files import these; none may pull in the training stack.
    code = ("import sys, jobs.taskspec, jobs.glue, jobs.deepspeed_config, jobs.specbase, jobs.storage; "
            "print(sorted(m for m in ('torch', 'datasets', 'sklearn', 'scipy', 'transformers', 'mlflow', 'ckd') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_flat_params(job_dir):
    spec = load_job_spec(write(job_dir, GOOD), env={})
    params = spec.flat_params()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())
    assert params["task.glue"] == "rte"
    assert params["training.learning_rate"] == "5e-05"
    assert params["student.from_teacher.layers"] == "[0,5]"
    assert params["deepspeed.config.zero_optimization.overlap_comm"] == "true"
    assert params["objective.terms.wr_angle.window"] == "11"
    assert params["objective_terms.wr_angle.window"] == "11"
    assert params["objective_terms.logit_kd.temperature"] == "3.0"  # the preset's RTE weight
    assert params["output.dir"] == str(job_dir / "out")
    assert params["teacher.cache_key"] == spec.teacher_cache_key()
    assert {"teacher.finetune.seed", "training.seed", "deepspeed.zero_stage", "output.mlflow.experiment"} <= set(params)
    # unset options (task.dataset, student.architecture, training.max_steps here) are left out
    assert "null" not in params.values()
    assert not {"task.dataset", "student.architecture", "training.max_steps"} & set(params)
    assert spec.task.dataset is None and spec.student.architecture is None and spec.training.max_steps is None


def test_flat_params_truncated(job_dir):
    long_key = "k" * 300
    spec = load_job_spec(write(job_dir, GOOD), [f"deepspeed.config.{long_key}=1",
                                                 f"output.mlflow.run_name={'x' * 7000}"], env={})
    params = spec.flat_params()
    assert all(len(k) <= 250 and len(v) <= 6000 for k, v in params.items())
    assert params["output.mlflow.run_name"].startswith("xxx") and params["output.mlflow.run_name"].endswith("]")
    assert any(k.startswith("deepspeed.config.kkk") for k in params)
    json.dumps(params)

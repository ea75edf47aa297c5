"""The real run of the jobs issue: the packaged all-MiniLM-L6-v2 teacher (6 layers, 384 wide) fine-tuned
briefly on a slice of the real SST-2 files, then a 2-layer student cut from it (teacher layers 0 and 5)
trained twice from the same start: distilled with CKD, and with cross-entropy alone; same rows, steps,
learning rate and seed. Both jobs share one cache directory, so the teacher is fine-tuned once, by the
first job.

The setting is the one distillation is for: a teacher trained on more labelled data than the student
sees. The teacher is fine-tuned on the first 3200 training rows (100 steps at batch 32, learning rate
2e-4: dev accuracy 0.821, majority class 0.509); the students train on the first 320 of those rows
for 100 steps (10 epochs; max length 64), evaluated on the whole SST-2 dev split (872 rows) at each
epoch end, the best dev checkpoint kept as the reference does. About 4 minutes on an idle 2-core CPU.

The CKD objective is the `ckd-paper` SST-2 preset (logit KD at T = 4 + WR pair + WR angle (window 21)
+ LTR pair + LTR angle) run as the reference's training loop runs it when distilling: without the CE
term; and with the reference's RTE/CoLA relation weights (WR pair 1, WR angle 10) rather than its
SST-2 ones (100, 1000), which were tuned for 4 epochs of all of SST-2 (about 8400 steps) and, in 100
steps, spend the student's budget on matching angles.

Measured at these settings (dev accuracy, student seeds 0 / 1 / 2):
CE 0.7592 / 0.7592 / 0.7649, CKD 0.7775 / 0.7787 / 0.7741 (+1.8 / +1.9 / +0.9 points);
logit KD alone (T = 1, no CE) 0.7752 / 0.7787 / 0.7775: at this budget the gain comes from the
teacher's soft labels, and the relation terms neither add nor cost anything measurable. With 3200
labelled rows for the student as well, every objective tied CE (docs/objectives.md, "A short budget:
the real MiniLM run").
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from jobkit import cli, write_yaml
from jobs.spec import load_job_spec

pytestmark = pytest.mark.slow

TEACHER_ROWS = 3200
STUDENT_ROWS = 320
MAX_LENGTH = 64
STEPS = 100
EVAL_STEPS = list(range(10, STEPS + 1, 10))  # each epoch end: 320 rows / batch 32
# The ckd-paper SST-2 objective (task taken from task.glue) as the reference distils, without CE, with
# the reference's RTE/CoLA relation weights for a short budget (module doc).
CKD = {"preset": "ckd-paper", "terms": {"ce": {"weight": 0}, "wr_pair": {"weight": 1}, "wr_angle": {"weight": 10}}}
CE = {"terms": {"ce": {"weight": 1}}}
FINETUNE_LOG = "fine-tuning teacher"


def minilm_job(glue_dir: Path, out: Path, objective: dict) -> dict:
    return {
        "task": {"glue": "sst2", "glue_dir": str(glue_dir), "max_train_examples": STUDENT_ROWS,
                 "max_length": MAX_LENGTH},  # no max_eval_examples: the whole dev split
        "teacher": {"source": "package:all-MiniLM-L6-v2",
                    "finetune": {"max_steps": STEPS, "learning_rate": 2e-4, "batch_size": 32, "seed": 0,
                                 "max_train_examples": TEACHER_ROWS}},
        "student": {"from_teacher": {"layers": [0, 5]}},
        "objective": objective,
        "training": {"max_steps": STEPS, "batch_size": 32, "learning_rate": 2e-4, "seed": 0,
                     "log_every_steps": 50},
        "output": {"dir": str(out)},
    }


@dataclass
class Run:
    job: Path
    out: Path
    log: str
    seconds: float
    metrics: dict
    teacher_files: dict[str, int]  # teacher dir file -> mtime_ns, right after this job


@dataclass
class Runs:
    cache: Path
    ckd: Run
    ce: Run


def snapshot(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, glue_dir: Path) -> Runs:
    root = tmp_path_factory.mktemp("minilm-real")
    cache = root / "cache"
    done = {}
    for name, objective in (("ckd", CKD), ("ce", CE)):  # the CKD job comes first: it fine-tunes the teacher
        out = root / name
        job = write_yaml(root / f"{name}.yaml", minilm_job(glue_dir, out, objective))
        start = time.perf_counter()
        proc = cli("run", str(job), env={"CKD_CACHE_DIR": str(cache)})
        seconds = time.perf_counter() - start
        teacher = cache / "teachers" / load_job_spec(job).teacher_cache_key()
        done[name] = Run(job, out, proc.stdout + proc.stderr, seconds,
                         json.loads((out / "metrics.json").read_text()), snapshot(teacher))
    return Runs(cache, **done)


def sst2_dev(glue_dir: Path) -> tuple[list[str], np.ndarray]:
    """The SST-2 dev sentences and gold ids, read straight from the TSV (independent of jobs.data)."""
    with open(glue_dir / "SST-2" / "dev.tsv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [r[0] for r in rows], np.array([int(r[1]) for r in rows])


def test_teacher_is_finetuned_once_and_clearly_beats_chance(runs, glue_dir):
    key = load_job_spec(runs.ckd.job).teacher_cache_key()
    assert load_job_spec(runs.ce.job).teacher_cache_key() == key  # the objective is not part of the key
    assert [p.name for p in (runs.cache / "teachers").iterdir() if p.is_dir()] == [key]
    # The first job fine-tuned it; the second loaded the cached copy and wrote nothing into it.
    assert FINETUNE_LOG in runs.ckd.log
    assert FINETUNE_LOG not in runs.ce.log
    assert runs.ce.teacher_files == runs.ckd.teacher_files
    assert {"config.json", "model.safetensors", "teacher_metrics.json"} <= set(runs.ckd.teacher_files)

    teacher = json.loads((runs.cache / "teachers" / key / "teacher_metrics.json").read_text())
    assert teacher["steps"] == STEPS and teacher["train_rows"] == TEACHER_ROWS
    for run in (runs.ckd, runs.ce):  # the students saw a tenth of the teacher's rows
        assert f"'train': {STUDENT_ROWS}," in run.log
    _, gold = sst2_dev(glue_dir)
    chance = max(gold.mean(), 1 - gold.mean())  # majority class: 0.509
    assert teacher["eval/accuracy"] >= chance + 0.2, teacher  # measured 0.82
    for run in (runs.ckd, runs.ce):
        assert run.metrics["summary"]["teacher/eval/accuracy"] == teacher["eval/accuracy"]


def test_ckd_student_exports_a_loadable_model(runs, glue_dir):
    for run in (runs.ckd, runs.ce):
        assert [h["step"] for h in run.metrics["history"]] == EVAL_STEPS
    student_dir = runs.ckd.out / "student"
    model = AutoModelForSequenceClassification.from_pretrained(student_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 384
    assert model.config.id2label == {0: "negative", 1: "positive"}
    # Its dev accuracy, recomputed from the raw TSV with the Hugging Face tokenizer and sklearn, is the
    # reported one.
    sentences, gold = sst2_dev(glue_dir)
    preds = []
    with torch.no_grad():
        for i in range(0, len(sentences), 128):
            enc = tokenizer(sentences[i:i + 128], truncation=True, max_length=MAX_LENGTH, padding=True,
                            return_tensors="pt")
            preds.append(model(**enc).logits.argmax(-1).numpy())
    assert len(gold) == 872
    assert accuracy_score(gold, np.concatenate(preds)) == pytest.approx(runs.ckd.metrics["summary"]["best/accuracy"])


def test_ckd_student_beats_the_same_student_trained_with_ce_alone(runs):
    ckd = runs.ckd.metrics["summary"]["best/accuracy"]
    ce = runs.ce.metrics["summary"]["best/accuracy"]
    # Measured +1.8 points at this seed (+0.9 to +1.9 over seeds 0-2); 0.5 points is 4-5 dev rows.
    assert ckd >= ce + 0.005, (f"CKD {ckd:.4f} vs CE {ce:.4f} (jobs took {runs.ckd.seconds:.0f} s and "
                               f"{runs.ce.seconds:.0f} s)")

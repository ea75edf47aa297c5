"""The real run of the jobs issue: the packaged all-MiniLM-L6-v2 teacher (6 layers, 384 wide) fine-tuned
briefly on a slice of the real SST-2 files, then a 2-layer student cut from it (teacher layers 0 and 5)
trained twice from the same start: distilled with the CKD paper objective, and with cross-entropy
alone; same slice, steps, learning rate and seed. Both jobs share one cache directory, so the teacher
is fine-tuned once, by the first job.

Settings, chosen on a 2-core CPU (3 min 40 s for the whole module on an otherwise idle machine):
3200 training rows (one epoch at batch 32 = 100 steps), the whole SST-2 dev split (872 rows), max
length 64; teacher: 100 steps, learning rate 2e-4 (dev accuracy 0.821; majority class 0.509); students:
100 steps, learning rate 2e-4, one evaluation, at the end.

The CKD objective is the `ckd-paper` SST-2 one (CE + logit KD at T = 4 + WR pair x100 + WR angle
(window 21) + LTR pair + LTR angle) with the WR angle weight at 100 instead of the paper's 1000. The
paper's weights were tuned for a pretrained 6-layer student trained for four epochs of all of SST-2
(about 8400 steps); in this 100-step budget the angle term at 1000 outweighs CE about 10 to 1 and
uses up the student's budget (measured, seed 0, before the window normaliser was aligned with the
reference's, which halves that term on SST-2: CKD 0.768 against CE 0.780). At 100 the weighted
relation terms and CE start at comparable values (about 0.5 and 0.44).

CKD still does not beat CE here. Measured at these settings (dev accuracy, student seeds 0 / 1 / 2):
CE 0.7798 / 0.7878 / 0.7798, CKD 0.7833 / 0.7833 / 0.7729: differences +0.35 / -0.46 / -0.69 points
(3, 4 and 6 dev rows), a tie at best.
Logit KD alone and the preset's RTE weights also tied CE in the previous session. A 2-layer student
learns what it can in 100 steps from the labels alone, and the teacher (0.821) is only 4 points
above it, so there is little for distillation to add at this budget. The comparison therefore stays
a strict xfail (it must be revisited when it starts to pass). See docs/objectives.md, "A short
budget: the real MiniLM run".
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

TRAIN_ROWS = 3200
MAX_LENGTH = 64
STEPS = 100
# The ckd-paper SST-2 objective (task taken from task.glue) with the angle weight for a short budget.
CKD = {"preset": "ckd-paper", "terms": {"wr_angle": {"weight": 100}}}
CE = {"terms": {"ce": {"weight": 1}}}
FINETUNE_LOG = "fine-tuning teacher"


def minilm_job(glue_dir: Path, out: Path, objective: dict) -> dict:
    return {
        "task": {"glue": "sst2", "glue_dir": str(glue_dir), "max_train_examples": TRAIN_ROWS,
                 "max_length": MAX_LENGTH},  # no max_eval_examples: the whole dev split
        "teacher": {"source": "package:all-MiniLM-L6-v2",
                    "finetune": {"max_steps": STEPS, "learning_rate": 2e-4, "batch_size": 32, "seed": 0}},
        "student": {"from_teacher": {"layers": [0, 5]}},
        "objective": objective,
        "training": {"max_steps": STEPS, "batch_size": 32, "learning_rate": 2e-4, "seed": 0,
                     "log_every_steps": 20},
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
    assert teacher["steps"] == STEPS
    _, gold = sst2_dev(glue_dir)
    chance = max(gold.mean(), 1 - gold.mean())  # majority class: 0.509
    assert teacher["eval/accuracy"] >= chance + 0.2, teacher  # measured 0.82
    for run in (runs.ckd, runs.ce):
        assert run.metrics["summary"]["teacher/eval/accuracy"] == teacher["eval/accuracy"]


def test_ckd_student_exports_a_loadable_model(runs, glue_dir):
    for run in (runs.ckd, runs.ce):
        assert [h["step"] for h in run.metrics["history"]] == [STEPS]  # one evaluation, after the last step
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


@pytest.mark.xfail(strict=True, reason="measured (seeds 0, 1, 2): CKD 0.7833 / 0.7833 / 0.7729 vs CE 0.7798 / "
                                       "0.7878 / 0.7798, a tie at best; "
                                       "a 2-layer student gains nothing measurable from distillation in 100 steps "
                                       "(module doc)")
def test_ckd_student_beats_the_same_student_trained_with_ce_alone(runs):
    ckd = runs.ckd.metrics["summary"]["best/accuracy"]
    ce = runs.ce.metrics["summary"]["best/accuracy"]
    assert ckd >= ce + 0.01, (f"CKD {ckd:.4f} vs CE {ce:.4f} (jobs took {runs.ckd.seconds:.0f} s and "
                              f"{runs.ce.seconds:.0f} s)")

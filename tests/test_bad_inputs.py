"""A corpus of hostile and mistaken grids and job specs (issue 14): each case is one small edit of a good
file, and each must end in a `SpecError` whose issues name the expected key (and say what is wrong),
before any model loads, in well under a second: no hang, no memory bomb, no traceback, no silent `plan OK`.

Cases run in-process through `load_job_spec` / `load_grid`; every one has its own timeout. The CLI
misuses of the same issue are tested with the CLI (tests/orchestrator).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jobkit import GLUE_DIR, edit, line_of
from jobs.datacheck import changed_job
from jobs.spec import load_job_spec
from jobs.specbase import MAX_CONFIG_BYTES, SpecError
from orchestrator.grid import GridSpec, load_grid

pytestmark = pytest.mark.usefixtures("glue_dir")

# One case's limit: each answers in well under a second; a regression to the old behaviour (minutes,
# gigabytes) fails here instead of hanging the suite.
CASE_TIMEOUT = 30

JOB = f"""\
task:
  glue: rte
  glue_dir: {GLUE_DIR}
  max_train_examples: 64
  max_length: 128
teacher:
  source: package:all-MiniLM-L6-v2
  finetune:
    epochs: 1
    learning_rate: 3e-5
student:
  from_teacher:
    layers: [0, 5]
    copy_classifier: true
objective:
  preset: ckd-paper
  terms:
    wr_angle: {{window: 11}}
training:
  epochs: 2
  batch_size: 16
  grad_accumulation: 2
  learning_rate: 5e-5
  warmup_ratio: 0.1
  weight_decay: 0.01
  grad_clip: 1.0
  seed: 42
deepspeed:
  zero_stage: 0
  offload_optimizer: false
output:
  dir: out
"""

# A dataset task over local files (train.csv, dev.jsonl written by each case).
DATA_JOB = edit(edit(JOB, f"  glue: rte\n  glue_dir: {GLUE_DIR}\n", """\
  dataset:
    files: {train: train.csv, validation: dev.jsonl}
  text_fields: [text]
  label_names: [neg, pos]
"""), "  preset: ckd-paper\n  terms:\n    wr_angle: {window: 11}\n", "  terms:\n    ce: {}\n    logit_kd: {}\n")
TRAIN_CSV = "text,label\ngood film,pos\nbad film,neg\nfine,1\n"
DEV_JSONL = '{"text": "great", "label": "pos"}\n{"text": "awful", "label": "neg"}\n'

GRID = f"""\
job:
  task: {{glue: rte, glue_dir: {GLUE_DIR}, max_train_examples: 64}}
  teacher: {{source: "package:all-MiniLM-L6-v2"}}
  student: {{from_teacher: {{layers: [0, 5]}}}}
  objective: {{preset: ckd-paper}}
  training: {{epochs: 3, batch_size: 8}}
sweep:
  space:
    training.learning_rate: {{loguniform: [1.0e-5, 1.0e-4]}}
    student:
      grid:
        - {{from_teacher: {{layers: [0, 5]}}}}
        - {{from_teacher: {{layers: [0, 2, 5]}}}}
    training.seed: {{choice: [1, 2]}}
  samples: 2
  search: {{algorithm: grid, seed: 0}}
  scheduler: {{kind: asha, grace_period: 1, reduction_factor: 2}}
  resources: {{workers: 2, cpus_per_worker: 0.5, gpus_per_worker: 0}}
  max_failures: 2
cluster: {{backend: local}}
mlflow: {{alias: champion}}
"""

ALIAS_BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, c in zip("abcdefgh", "bcdefghi"))
DEEP = "[" * 3000 + "]" * 3000


@dataclass
class Case:
    """One bad input: the file's text, the key an issue must name ("" for the file as a whole) and words
    its message must contain; `files` are written beside it (str or bytes), `overrides` applied."""

    text: str | bytes
    key: str
    words: tuple[str, ...] = ()
    files: dict[str, str | bytes] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()


def job(old: str, new: str, key: str, *words: str, base: str = JOB, **kw) -> Case:
    return Case(edit(base, old, new), key, words, **kw)


def data(key: str, *words: str, train: str | bytes = TRAIN_CSV, dev: str | bytes = DEV_JSONL, text: str = DATA_JOB
         ) -> Case:
    return Case(text, key, words, files={"train.csv": train, "dev.jsonl": dev})


def training(line: str, key: str, *words: str, old: str | None = None) -> Case:
    """A line of the training section replaced: `line` is "name: value" (replacing `old`, by default the
    line of that name)."""
    name = line.split(":")[0]
    old = old or next(item for item in JOB.splitlines(keepends=True) if item.startswith(f"  {name}:"))
    return Case(edit(JOB, old, f"  {line}\n"), key, words)


LAYERS = "  terms:\n    wr_angle: {window: 11}\n"
ARCH = "  from_teacher:\n    layers: [0, 5]\n    copy_classifier: true\n"

JOB_CASES: dict[str, Case] = {
    # --- strings, booleans and non-finite numbers for numbers
    "epochs-string": training('epochs: "2"', "training.epochs", "string"),
    "epochs-true": training("epochs: true", "training.epochs", "boolean"),
    "epochs-fraction": training("epochs: 2.5", "training.epochs", "integer"),
    "epochs-zero": training("epochs: 0", "training.epochs", "greater than or equal to 1"),
    "epochs-list": training("epochs: [2]", "training.epochs", "integer"),
    "lr-inf": training("learning_rate: .inf", "training.learning_rate", "finite"),
    "lr-minus-inf": training("learning_rate: -.inf", "training.learning_rate", "finite"),
    "lr-nan": training("learning_rate: .nan", "training.learning_rate", "finite"),
    "lr-quoted": training('learning_rate: "3e-5"', "training.learning_rate", "string"),
    "lr-true": training("learning_rate: true", "training.learning_rate", "boolean"),
    "lr-zero": training("learning_rate: 0", "training.learning_rate", "greater than 0"),
    "lr-negative": training("learning_rate: -1e-5", "training.learning_rate", "greater than 0"),
    "batch-string": training('batch_size: "16"', "training.batch_size", "string"),
    "batch-false": training("batch_size: false", "training.batch_size", "boolean"),
    "batch-zero": training("batch_size: 0", "training.batch_size", "greater than or equal to 1"),
    "batch-not-divisible": training("batch_size: 15", "training.batch_size", "divisible"),
    "accum-true": training("grad_accumulation: true", "training.grad_accumulation", "boolean"),
    "warmup-one": training("warmup_ratio: 1.0", "training.warmup_ratio", "less than 1"),
    "warmup-nan": training("warmup_ratio: .nan", "training.warmup_ratio", "finite"),
    "decay-negative": training("weight_decay: -0.1", "training.weight_decay", "greater than or equal to 0"),
    "decay-string": training("weight_decay: none", "training.weight_decay", "string"),
    "clip-inf": training("grad_clip: .inf", "training.grad_clip", "finite"),
    "seed-string": training('seed: "42"', "training.seed", "string"),
    "seed-float": training("seed: 4.2", "training.seed", "integer"),
    "eval-batch-list": job("  seed: 42\n", "  seed: 42\n  eval_batch_size: [64]\n", "training.eval_batch_size"),
    "max-steps-string": job("  seed: 42\n", '  seed: 42\n  max_steps: "10"\n', "training.max_steps", "string"),
    "log-every-zero": job("  seed: 42\n", "  seed: 42\n  log_every_steps: 0\n", "training.log_every_steps"),
    "finetune-epochs-string": job("    epochs: 1\n", '    epochs: "1"\n', "teacher.finetune.epochs", "string"),
    "finetune-lr-inf": job("    learning_rate: 3e-5\n", "    learning_rate: .inf\n", "teacher.finetune.learning_rate",
                           "finite"),
    "max-train-true": job("  max_train_examples: 64\n", "  max_train_examples: true\n", "task.max_train_examples",
                          "boolean"),
    "max-length-string": job("  max_length: 128\n", '  max_length: "128"\n', "task.max_length", "string"),
    "max-length-one": job("  max_length: 128\n", "  max_length: 1\n", "task.max_length"),
    "zero-stage-string": job("  zero_stage: 0\n", '  zero_stage: "2"\n', "deepspeed.zero_stage", "string"),
    "zero-stage-four": job("  zero_stage: 0\n", "  zero_stage: 4\n", "deepspeed.zero_stage"),
    "offload-yes": job("  offload_optimizer: false\n", '  offload_optimizer: "yes"\n',
                       "deepspeed.offload_optimizer", "boolean"),
    "copy-classifier-int": job("    copy_classifier: true\n", "    copy_classifier: 1\n",
                               "student.from_teacher.copy_classifier", "boolean"),
    "layers-strings": job("    layers: [0, 5]\n", '    layers: ["0", "5"]\n', "student.from_teacher.layers[0]",
                          "string"),
    "layers-bool": job("    layers: [0, 5]\n", "    layers: [0, true]\n", "student.from_teacher.layers[1]", "boolean"),
    "arch-string": job(ARCH, '  architecture: {num_layers: "2", hidden_size: 64, num_heads: 4, '
                             'intermediate_size: 128}\n', "student.architecture.num_layers", "string"),
    "temperature-inf": job(LAYERS, "  terms:\n    logit_kd: {temperature: .inf}\n",
                           "objective.terms.logit_kd.temperature", "finite"),
    "weight-nan": job(LAYERS, "  terms:\n    ce: {weight: .nan}\n", "objective.terms.ce.weight", "finite"),
    "window-string": job(LAYERS, '  terms:\n    wr_angle: {window: "11"}\n', "objective.terms.wr_angle.window"),
    # --- layer maps against both depths, max_length against the teacher's positions
    "layer-map-student": job(LAYERS, "  terms:\n    wr_pair: {layers: [[7, 6]]}\n", "objective.terms.wr_pair.layers",
                             "student layer 7", "0..2"),
    "layer-map-teacher": job(LAYERS, "  terms:\n    wr_angle: {layers: [[0, 0], [2, 7]]}\n",
                             "objective.terms.wr_angle.layers", "teacher layer 7", "0..6"),
    "layer-map-order": job(LAYERS, "  terms:\n    ltr_pair: {layers: [[2, 6], [1, 3]]}\n",
                           "objective.terms.ltr_pair.layers", "increasing"),
    "layer-map-strategy": job(LAYERS, "  terms:\n    ltr_angle: {layers: middle}\n",
                              "objective.terms.ltr_angle.layers", "unknown strategy"),
    "layer-map-pairs": job(LAYERS, "  terms:\n    pkd: {layers: [[1, 2, 3]]}\n", "objective.terms.pkd.layers",
                           "pairs"),
    "codir-teacher-layers": job(LAYERS, "  terms:\n    codir: {teacher_layers: [9]}\n",
                                "objective.terms.codir.teacher_layers", "1..6"),
    "codir-student-layers": job(LAYERS, "  terms:\n    codir: {student_layers: [3]}\n",
                                "objective.terms.codir.student_layers", "1..2"),
    "minilm-teacher-layer": job(LAYERS, "  terms:\n    minilm: {teacher_layer: 9}\n",
                                "objective.terms.minilm.teacher_layer", "1..6"),
    "layer-map-architecture": Case(edit(edit(JOB, ARCH, "  architecture: {num_layers: 2, hidden_size: 64, "
                                                        "num_heads: 4, intermediate_size: 128}\n"),
                                        LAYERS, "  terms:\n    tinybert_hidden: {layers: [[3, 6]]}\n"),
                                   "objective.terms.tinybert_hidden.layers", ("student layer 3",)),
    "from-teacher-layer": job("    layers: [0, 5]\n", "    layers: [0, 9]\n", "student.from_teacher.layers",
                              "6-layer teacher"),
    "max-length-positions": job("  max_length: 128\n", "  max_length: 100000\n", "task.max_length", "512 positions"),
    # --- the YAML itself
    "alias-bomb": Case(ALIAS_BOMB, "", ("alias",)),
    "recursive-alias": Case("a: &a [*a]\n", "", ("recursive",)),
    "deep-brackets": Case(f"task: {DEEP}\n", "", ("nested",)),
    "deep-mappings": Case("task: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "", ("nested",)),
    "latin-1": Case(JOB.replace("  seed: 42\n", "  seed: 42  # café\n").encode("latin-1"), "",
                    ("UTF-8", f"job.yaml:{line_of(JOB, '  seed: 42')}:")),
    "too-big": Case(JOB + "#" * MAX_CONFIG_BYTES, "", ("larger than",)),
    "duplicate-key": job("  seed: 42\n", "  seed: 42\n  seed: 43\n", "", "duplicate key"),
    "tab-indent": job("  seed: 42\n", "\tseed: 42\n", "", "YAML"),
    "top-level-list": Case("- task\n- teacher\n", "", ("mapping",)),
    "unclosed-bracket": job("    layers: [0, 5]\n", "    layers: [0, 5\n", "", "YAML"),
    "unknown-key": training("epoch: 2", "training.epoch", "did you mean", old="  epochs: 2\n"),
    "override-true": Case(JOB, "training.epochs", ("boolean", "override"), overrides=("training.epochs=true",)),
    "override-inf": Case(JOB, "training.learning_rate", ("finite",), overrides=("training.learning_rate=.inf",)),
    "override-deep": Case(JOB, "training.seed", ("not valid YAML",), overrides=(f"training.seed={DEEP}",)),
    # --- data files: checked before any model or dataset loads, naming the file and the line
    "data-no-label-column": data("task.dataset.files.train", "train.csv", "missing column", "label",
                                 train="text,y\na,pos\n"),
    "data-label-outside": data("task.dataset.files.train", "line 3", "'maybe'", "label list",
                               train="text,label\na,pos\nb,maybe\n"),
    "data-label-id-outside": data("task.dataset.files.train", "line 2", "'7'", train="text,label\na,7\n"),
    "data-empty": data("task.dataset.files.train", "empty", train=""),
    "data-blank": data("task.dataset.files.train", "empty", train="\n\n  \n"),
    "data-header-only": data("task.dataset.files.train", "header but no rows", train="text,label\n"),
    "data-no-text-column": data("task.dataset.files.train", "missing column", "sentence",
                                text=DATA_JOB.replace("text_fields: [text]", "text_fields: [sentence]")),
    "data-latin-1": data("task.dataset.files.train", "UTF-8", "line 2",
                         train="text,label\ncaf\xe9,pos\n".encode("latin-1")),
    "data-short-row": data("task.dataset.files.train", "line 3", "fewer fields", train="text,label\na,pos\n\"b\"\n"),
    "data-long-row": data("task.dataset.files.train", "line 2", "more fields", train="text,label\na,pos,extra\n"),
    "data-dev-no-label": data("task.dataset.files.validation", "line 2", "label None",
                              dev='{"text": "a", "label": "pos"}\n{"text": "b"}\n'),
    "data-dev-bad-json": data("task.dataset.files.validation", "dev.jsonl", "line 2", "JSON",
                              dev='{"text": "a", "label": "pos"}\n{"text": "b", label}\n'),
    "data-dev-not-object": data("task.dataset.files.validation", "line 1", "JSON object", dev='["a", "pos"]\n'),
    "data-dev-null-text": data("task.dataset.files.validation", "line 1", "text field 'text'",
                               dev='{"text": null, "label": "pos"}\n'),
    "data-dev-number-text": data("task.dataset.files.validation", "line 1", "not text",
                                 dev='{"text": 5, "label": "pos"}\n'),
    "data-dev-label-outside": data("task.dataset.files.validation", "line 2", "'meh'",
                                   dev='{"text": "a", "label": "pos"}\n{"text": "b", "label": "meh"}\n'),
    "data-dev-empty": data("task.dataset.files.validation", "empty", dev=""),
    "data-label-field-missing": data("task.dataset.files.train", "missing column", "'y'",
                                     text=DATA_JOB.replace("  label_names:", "  label_field: y\n  label_names:")),
    "data-regression-text-score": data("task.dataset.files.train", "line 2", "finite number",
                                       train="text,label\na,high\n",
                                       text=DATA_JOB.replace("  label_names: [neg, pos]\n", "  regression: true\n")),
    "data-json-list-bad-label": Case(DATA_JOB.replace("dev.jsonl", "dev.json"), "task.dataset.files.validation",
                                     ("item 2", "'x'"), files={"train.csv": TRAIN_CSV, "dev.json": json.dumps(
                                         [{"text": "a", "label": "neg"}, {"text": "b", "label": "x"}])}),
    "data-json-not-records": Case(DATA_JOB.replace("dev.jsonl", "dev.json"), "task.dataset.files.validation",
                                  ("list of JSON objects",), files={"train.csv": TRAIN_CSV, "dev.json": "[1, 2]"}),
    "data-missing-file": data("task.dataset.files.train", "does not exist",
                              text=DATA_JOB.replace("train.csv", "nowhere.csv")),
}

SPACE = "    training.seed: {choice: [1, 2]}\n"


def grid(old: str, new: str, key: str, *words: str, **kw) -> Case:
    return Case(edit(GRID, old, new), key, words, **kw)


def space(domain: str, key: str, *words: str) -> Case:
    """One more domain in sweep.space: `domain` is "job.key: {kind: ...}"."""
    return grid(SPACE, SPACE + f"    {domain}\n", key, *words)


GRID_CASES: dict[str, Case] = {
    # --- trials counted, not materialised
    "samples-billion": grid("  samples: 2\n", "  samples: 1000000000\n", "sweep.samples", "2,000,000,000 trials",
                            "sweep.max_trials"),
    "grid-combinations": grid(SPACE, SPACE + "    training.weight_decay: {grid: [%s]}\n    task.max_length: "
                                             "{grid: [%s]}\n" % (", ".join(str(i / 1000) for i in range(200)),
                                                                 ", ".join(str(i) for i in range(64, 264))),
                              "sweep.space", "sweep.max_trials"),
    "max-trials-low": grid("  max_failures: 2\n", "  max_failures: 2\n  max_trials: 3\n", "sweep.space",
                           "4 trials"),
    "max-trials-zero": grid("  max_failures: 2\n", "  max_failures: 2\n  max_trials: 0\n", "sweep.max_trials"),
    "max-trials-string": grid("  max_failures: 2\n", '  max_failures: 2\n  max_trials: "100"\n', "sweep.max_trials",
                              "string"),
    "samples-string": grid("  samples: 2\n", '  samples: "2"\n', "sweep.samples", "string"),
    "samples-true": grid("  samples: 2\n", "  samples: true\n", "sweep.samples", "boolean"),
    "samples-zero": grid("  samples: 2\n", "  samples: 0\n", "sweep.samples"),
    "samples-override": Case(GRID, "sweep.samples", ("sweep.max_trials", "override"),
                             overrides=("sweep.samples=1000000000",)),
    # --- numbers in the sweep's own sections
    "workers-string": grid("workers: 2,", 'workers: "2",', "sweep.resources.workers", "string"),
    "cpus-inf": grid("cpus_per_worker: 0.5", "cpus_per_worker: .inf", "sweep.resources.cpus_per_worker", "finite"),
    "cpus-nan": grid("cpus_per_worker: 0.5", "cpus_per_worker: .nan", "sweep.resources.cpus_per_worker", "finite"),
    "gpus-true": grid("gpus_per_worker: 0", "gpus_per_worker: true", "sweep.resources.gpus_per_worker", "boolean"),
    "grace-string": grid("grace_period: 1,", 'grace_period: "1",', "sweep.scheduler.grace_period", "string"),
    "reduction-inf": grid("reduction_factor: 2", "reduction_factor: .inf", "sweep.scheduler.reduction_factor",
                          "finite"),
    "max-failures-string": grid("  max_failures: 2\n", '  max_failures: "2"\n', "sweep.max_failures", "string"),
    "concurrent-true": grid("  max_failures: 2\n", "  max_failures: 2\n  max_concurrent_trials: true\n",
                            "sweep.max_concurrent_trials", "boolean"),
    "search-seed-string": grid("seed: 0}", 'seed: "0"}', "sweep.search.seed", "string"),
    # --- values of the space
    "grid-inf": space("training.weight_decay: {grid: [0.0, .inf]}", "sweep.space.training.weight_decay", "finite"),
    "grid-quoted-lr": space('training.warmup_ratio: {grid: [0.1, "0.2"]}', "sweep.space.training.warmup_ratio",
                            "string"),
    "choice-true-epochs": space("training.epochs: {choice: [2, true]}", "sweep.space.training.epochs", "boolean"),
    "choice-nan": space("training.grad_clip: {choice: [1.0, .nan]}", "sweep.space.training.grad_clip", "finite"),
    "loguniform-inf": space("training.weight_decay: {loguniform: [1.0e-5, .inf]}",
                            "sweep.space.training.weight_decay", "finite numbers"),
    "uniform-string": space('training.warmup_ratio: {uniform: ["0", 0.2]}', "sweep.space.training.warmup_ratio",
                            "finite numbers"),
    "randint-string": space('training.epochs: {randint: [1, "9"]}', "sweep.space.training.epochs", "finite numbers"),
    "quniform-inf": space("training.grad_clip: {quniform: [0, .inf, 1]}", "sweep.space.training.grad_clip",
                          "finite numbers"),
    "space-max-length": space("task.max_length: {grid: [128, 100000]}", "sweep.space.task.max_length",
                              "512 positions"),
    "space-layer-map": space("objective.terms.wr_pair.layers: {grid: [[[1, 3]], [[7, 6]]]}",
                             "sweep.space.objective.terms.wr_pair.layers", "student layer 7"),
    "space-student-too-shallow": Case(edit(edit(GRID, "  objective: {preset: ckd-paper}\n",
                                                "  objective: {preset: ckd-paper, terms: {wr_pair: {layers: [[2, 6]]}}}\n"),
                                           "{layers: [0, 2, 5]}", "{layers: [5]}"),
                                      "sweep.space.student", ("student layer 2", "0..1")),
    "space-override-deep": Case(GRID, "sweep.space.training.seed.choice", ("not valid YAML",),
                                overrides=(f"sweep.space.training.seed.choice={DEEP}",)),
    # --- the base job inline
    "job-epochs-string": grid("epochs: 3,", 'epochs: "3",', "job.training.epochs", "string"),
    "job-lr-inf": grid("epochs: 3,", "epochs: 3, learning_rate: .inf,", "job.training.learning_rate", "finite"),
    "job-max-length": grid("max_train_examples: 64}", "max_train_examples: 64, max_length: 100000}",
                           "job.task.max_length", "512 positions"),
    "job-layer-map": grid("  objective: {preset: ckd-paper}\n",
                          "  objective: {preset: ckd-paper, terms: {wr_pair: {layers: [[7, 6]]}}}\n",
                          "job.objective.terms.wr_pair.layers", "student layer 7"),
    "job-copy-classifier": grid("  student: {from_teacher: {layers: [0, 5]}}\n", "  student: {from_teacher: "
                                "{layers: [0, 5], copy_classifier: 'true'}}\n", "job.student.from_teacher.copy_classifier"),
    # --- the YAML itself
    "alias-bomb": Case(ALIAS_BOMB, "", ("alias",)),
    "alias-bomb-in-sweep": grid(SPACE, SPACE + "".join("    " + line + "\n" for line in ALIAS_BOMB.splitlines()),
                                "", "alias"),
    "recursive-alias": grid("  samples: 2\n", "  samples: 2\n  bad: &r [*r]\n", "", "recursive"),
    "deep-brackets": grid("  samples: 2\n", f"  samples: {DEEP}\n", "", "nested"),
    "latin-1": Case(GRID.replace("mlflow: {alias: champion}\n", "mlflow: {alias: champion}  # ré\n")
                    .encode("latin-1"), "", ("UTF-8", f"grid.yaml:{line_of(GRID, 'mlflow:')}:")),
    "too-big": Case(GRID + "#" * MAX_CONFIG_BYTES, "", ("larger than",)),
    "choice-300k-file": Case(edit(GRID, SPACE, "    training.seed: {choice: [%s]}\n"
                                  % ", ".join(map(str, range(300_000)))), "", ("larger than",)),
    # --- the base job as a file
    "job-file-latin-1": Case(GRID.split("sweep:")[0].split("job:")[0] + "job: job.yaml\nsweep:"
                             + GRID.split("sweep:")[1], "job", ("UTF-8",),
                             files={"job.yaml": JOB.replace("  seed: 42\n", "  seed: 42  # é\n").encode("latin-1")}),
    "job-file-bomb": Case("job: job.yaml\nsweep: {samples: 1}\n", "job", ("alias",), files={"job.yaml": ALIAS_BOMB}),
    "job-file-deep": Case("job: job.yaml\n", "job", ("nested",), files={"job.yaml": f"task: {DEEP}\n"}),
    "job-file-epochs-true": Case("job: job.yaml\n", "job.training.epochs", ("boolean",),
                                 files={"job.yaml": JOB.replace("  epochs: 2\n", "  epochs: true\n")}),
    "job-file-override": Case("job: job.yaml\n", "job.training.epochs", ("string",), files={"job.yaml": JOB},
                              overrides=('job.training.epochs="2"',)),
    # --- where the sweep goes
    "root-is-a-file": Case(GRID + "root: taken\n", "root", ("is a file",), files={"taken": "not a directory\n"}),
    "mlflow-experiment-int": grid("mlflow: {alias: champion}", "mlflow: {alias: champion, experiment: 123}",
                                  "mlflow.experiment", "string"),
}


def _write(tmp_path: Path, case: Case, name: str) -> Path:
    for file_name, content in case.files.items():
        target = tmp_path / file_name
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    path = tmp_path / name
    path.write_bytes(case.text) if isinstance(case.text, bytes) else path.write_text(case.text)
    return path


def _check(err: SpecError, case: Case, path: Path) -> None:
    found = [i for i in err.issues if i.key == case.key]
    assert found, f"no issue at {case.key!r}; got:\n{err}"
    text = str(err)
    for word in case.words:
        assert word in text, f"{word!r} not in:\n{text}"
    assert all(i.file for i in err.issues) and str(path) in text or case.key.startswith("job"), text


@pytest.mark.timeout(CASE_TIMEOUT)
@pytest.mark.parametrize("name", list(JOB_CASES))
def test_bad_job_spec(name, tmp_path):
    case = JOB_CASES[name]
    path = _write(tmp_path, case, "job.yaml")
    with pytest.raises(SpecError) as info:
        load_job_spec(path, case.overrides, env={})
    _check(info.value, case, path)


@pytest.mark.timeout(CASE_TIMEOUT)
@pytest.mark.parametrize("name", list(GRID_CASES))
def test_bad_grid(name, tmp_path):
    case = GRID_CASES[name]
    path = _write(tmp_path, case, "grid.yaml")
    with pytest.raises(SpecError) as info:
        load_grid(path, case.overrides)
    _check(info.value, case, path)


def test_the_corpus_is_large():
    assert len(JOB_CASES) + len(GRID_CASES) >= 100


def test_good_files_still_load(tmp_path):
    """The edits above break good files: the files themselves, ints for floats and `3e-5` included, load."""
    assert load_job_spec(_write(tmp_path, Case(JOB, ""), "job.yaml"), env={}).training.learning_rate == 5e-5
    spec = load_job_spec(_write(tmp_path, data(""), "data.yaml"), env={})
    assert spec.task.dataset is not None
    assert load_grid(_write(tmp_path, Case(GRID, ""), "grid.yaml")).total_trials() == 2 * 2
    text = edit(JOB, "  learning_rate: 5e-5\n", "  learning_rate: 1\n")
    assert load_job_spec(_write(tmp_path, Case(text, ""), "int.yaml"), env={}).training.learning_rate == 1.0
    # An anchor, an alias and a merge key are still fine: only their expansion is bounded.
    text = edit(JOB, "training:\n  epochs: 2\n  batch_size: 16\n",
                "training:\n  <<: {epochs: 2}\n  batch_size: &batch 16\n  eval_batch_size: *batch\n")
    spec = load_job_spec(_write(tmp_path, Case(text, ""), "anchors.yaml"), env={})
    assert (spec.training.epochs, spec.training.eval_batch_size) == (2, 16)


@pytest.mark.timeout(CASE_TIMEOUT)
def test_a_choice_of_300k_values_is_validated_by_type_at_once(tmp_path):
    """A huge choice (built in memory: the file would exceed the size cap) is checked on a sample that
    covers every type and the numbers' extremes, so a bad value among 300,000 is found in a second."""
    base = load_grid(_write(tmp_path, Case(GRID, ""), "grid.yaml")).to_dict()
    sweep = {"space": {}, "search": {"algorithm": "random"}, "samples": 1}

    def build(key, values):
        return GridSpec.from_mapping({"job": base["job"], "sweep": {**sweep, "space": {key: {"choice": values}}}},
                                     base_dir=tmp_path, file=tmp_path / "grid.yaml")

    start = time.monotonic()
    assert build("training.seed", list(range(300_000))).total_trials() == 1
    for key, values, words in (
            ("training.seed", [*range(150_000), "x", *range(150_000, 300_000)], "'x'"),
            ("training.batch_size", [*range(8, 300_000), 0], "value 0"),
            ("training.learning_rate", [*(i * 1e-9 + 1e-6 for i in range(299_999)), float("inf")], "finite")):
        with pytest.raises(SpecError) as info:
            build(key, values)
        assert any(i.key == f"sweep.space.{key}" for i in info.value.issues) and words in str(info.value)
    assert time.monotonic() - start < 20


def test_rerun_with_another_spec_is_a_changed_job(tmp_path):
    """run_job refuses to resume (or return the summary of) a checkpoint written by another spec."""
    recorded = {"training": {"learning_rate": 5e-5, "epochs": 2}, "output": {"mlflow": {"tracking_uri": "a"}}}
    (tmp_path / "job.json").write_text(json.dumps(recorded))
    assert changed_job(tmp_path / "job.json", recorded) is None
    moved = {**recorded, "output": {"mlflow": {"tracking_uri": "b"}}}  # where it reports: not the job
    assert changed_job(tmp_path / "job.json", moved) is None
    other = {**recorded, "training": {"learning_rate": 3e-5, "epochs": 2}}
    assert changed_job(tmp_path / "job.json", other) == ("training.learning_rate", 5e-5, 3e-5)
    assert changed_job(tmp_path / "nothing.json", other) is None


@pytest.mark.timeout(CASE_TIMEOUT)
def test_a_big_data_file_is_checked_on_its_prefix(tmp_path):
    """Only MAX_CHECKED_BYTES of a data file are read at validation: a bad label near the start is found,
    one past the prefix is left to the job's reader (which names the file too), and a record cut by the
    prefix is not mistaken for a short row."""
    from jobs.datacheck import MAX_CHECKED_BYTES

    rows = '"a review, over\ntwo lines",pos\n' * (MAX_CHECKED_BYTES // 30 + 10)
    case = data("", train="text,label\n" + rows + "b,bad\n")
    start = time.monotonic()
    assert load_job_spec(_write(tmp_path, case, "job.yaml"), env={}).task.dataset is not None
    bad = data("task.dataset.files.train", "line 3", "'bad'", train="text,label\na,pos\nb,bad\n" + rows)
    with pytest.raises(SpecError) as info:
        load_job_spec(_write(tmp_path, bad, "job.yaml"), env={})
    _check(info.value, bad, tmp_path / "job.yaml")
    assert time.monotonic() - start < 10

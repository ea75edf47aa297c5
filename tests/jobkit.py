"""Helpers for tests that write job specs and run the CLI (importable as `jobkit`: tests/ is on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# The real GLUE files: ../shared/glue beside the checkout, or $CKD_GLUE_DIR.
GLUE_DIR = Path(os.environ.get("CKD_GLUE_DIR", REPO.parent / "shared" / "glue"))


def tiny_job(glue_dir: Path, teacher: Path, out_dir: Path, **sections: dict) -> dict:
    """A fast job mapping: RTE slices, the tiny teacher, a 2-layer student, the CKD paper objective."""
    job = {
        "task": {"glue": "rte", "glue_dir": str(glue_dir), "max_train_examples": 64, "max_eval_examples": 32,
                 "max_length": 64},
        "teacher": {"source": str(teacher)},
        "student": {"from_teacher": {"layers": [0, 3]}},
        "objective": {"preset": "ckd-paper"},
        "training": {"max_steps": 8, "batch_size": 8, "eval_every_steps": 4, "log_every_steps": 2},
        "output": {"dir": str(out_dir)},
    }
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return job


def sweep_base_job(glue_dir: Path, teacher: Path, *, epochs: int, log_every_steps: int) -> dict:
    """`tiny_job` as a grid's base job: trained by epochs (what ASHA counts and evaluations follow), its
    output directory left to the sweep (one per trial)."""
    job = tiny_job(glue_dir, teacher, Path("unused"), training={"epochs": epochs, "batch_size": 8,
                                                               "log_every_steps": log_every_steps})
    job["training"].pop("max_steps")
    job["training"].pop("eval_every_steps")
    del job["output"]
    return job


def only_sweep(root: Path) -> Path:
    """The one sweep directory under a grid's root."""
    (sweep,) = [p for p in root.iterdir() if (p / "sweep.json").is_file()]
    return sweep


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli(*args: str, env: dict | None = None, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """`ckd-orchestrate ARGS` in a fresh process (DeepSpeed and Ray keep process-wide state)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ckd-orchestrate {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def edit(text: str, old: str, new: str) -> str:
    """`text` with the first `old` replaced (which must be there): a small change to a valid spec."""
    assert old in text, old
    return text.replace(old, new, 1)


def line_of(text: str, needle: str) -> int:
    """1-based number of the first line of `text` containing `needle` (where an error must point)."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)

"""The teacher stage: use the teacher as given, or fine-tune a pretrained encoder on the task first.

A fine-tuned teacher is cached under `<cache root>/teachers/<JobSpec.teacher_cache_key()>`, so every
trial of a sweep (and every rerun of a job) that asks for the same teacher fine-tunes it once. The
first process to arrive takes a file lock and trains; the others wait on the lock and then load the
result. The export is atomic (`export_student`), so a crash mid-fine-tune leaves no half teacher.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import get_linear_schedule_with_warmup

from jobs.data import make_dataloader, model_inputs
from jobs.evaluation import evaluate, load_job_data
from jobs.models import PROBLEM_TYPES, export_student, load_teacher, load_tokenizer
from jobs.storage import cache_root, file_lock, write_json_atomic

log = logging.getLogger(__name__)

METRICS_FILE = "teacher_metrics.json"


def teacher_dir(spec: Any) -> Path:
    return cache_root() / "teachers" / spec.teacher_cache_key()


def prepare_teacher(spec: Any, *, device: torch.device | None = None) -> str:
    """The teacher source the job distils from: `teacher.source` itself, or the cached fine-tuned copy
    (fine-tuning it now when no process has yet)."""
    if spec.teacher.finetune is None:
        return spec.teacher.source
    out = teacher_dir(spec)
    if (out / "config.json").is_file():
        return str(out)
    with file_lock(out.with_name(out.name + ".lock")):
        if not (out / "config.json").is_file():  # another process may have finished while we waited
            finetune_teacher(spec, out, device=device or torch.device("cpu"))
    return str(out)


def finetune_teacher(spec: Any, out: Path, *, device: torch.device) -> dict[str, float]:
    """Fine-tune `teacher.source` on the task's training split (plain AdamW, one process) and export it
    to `out` with its dev metrics in `teacher_metrics.json`."""
    ft = spec.teacher.finetune
    task = spec.task.task_info()
    problem = PROBLEM_TYPES[1] if task.is_regression else PROBLEM_TYPES[0]
    tokenizer = load_tokenizer(spec.teacher.source)
    data = load_job_data(spec, tokenizer, for_teacher=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ft.seed)  # the fresh classifier head and dropout: part of the cache key
        model = load_teacher(spec.teacher.source, task.num_labels, task.label_names, problem)
        model.requires_grad_(True).train().to(device)
        loader = make_dataloader(data["train"], tokenizer, ft.batch_size, shuffle=True, seed=ft.seed)
        steps_per_epoch = len(loader)
        total = ft.max_steps or ft.epochs * steps_per_epoch
        optimizer = torch.optim.AdamW(model.parameters(), lr=ft.learning_rate, weight_decay=0.01)
        schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(ft.warmup_ratio * total), total)
        log.info("fine-tuning teacher %s on %s: %d steps over %d training rows", spec.teacher.source, task.name,
                 total, len(data["train"]))
        step, start = 0, time.perf_counter()
        epoch = 0
        while step < total:
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
                loss = model(**inputs, labels=batch["label"].to(device)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % 10 == 0 or step == total:
                    log.info("teacher fine-tune step %d/%d loss %.4f (%.1f s)", step, total, loss.item(),
                             time.perf_counter() - start)
                if step >= total:
                    break
            epoch += 1
    metrics = evaluate(model, data, task, tokenizer, batch_size=64, device=device)
    log.info("fine-tuned teacher dev metrics: %s", metrics)
    model.eval().requires_grad_(False)
    export_student(model, tokenizer, out, task.label_names, overwrite=True)
    write_json_atomic(out / METRICS_FILE, {"steps": total, "train_rows": len(data["train"]),
                                           "seconds": time.perf_counter() - start, **metrics})
    return metrics


def teacher_metrics(source: str) -> dict[str, float]:
    """The dev metrics recorded when a cached teacher was fine-tuned ({} for a teacher used as given)."""
    path = Path(source) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}

"""Data of a job and its evaluation on the dev split(s), in one process or sharded over many."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import DatasetDict
from torch import nn

from jobs.data import load_task_dataset, make_dataloader, model_inputs, task_source, tokenize_dataset
from jobs.distributed import barrier, gather_objects
from jobs.glue import EVAL_LOSS, TaskInfo
from jobs.metrics import compute_metrics
from jobs.storage import cache_root


def prepare_data(spec: Any, tokenizer: Any, *, is_main: bool = True) -> DatasetDict:
    """The job's tokenised train and dev splits. The main process tokenises first and fills the cache;
    the others then read the cached files instead of tokenising the same rows concurrently."""
    if is_main:
        data = load_job_data(spec, tokenizer)
        barrier()
    else:
        barrier()
        data = load_job_data(spec, tokenizer)
    return data


def load_job_data(spec: Any, tokenizer: Any, *, for_teacher: bool = False) -> DatasetDict:
    """The job's tokenised splits in this process alone (no coordination with other ranks); with
    `for_teacher`, the training rows the teacher is fine-tuned on."""
    task = spec.task
    rows = spec.teacher_train_examples() if for_teacher else task.max_train_examples
    raw = load_task_dataset(task_source(task), max_train_examples=rows,
                            max_eval_examples=task.max_eval_examples, subset_seed=task.subset_seed)
    return tokenize_dataset(raw, tokenizer, task.task_info(), max_length=task.max_length,
                            cache_dir=cache_root() / "tokenized")


@torch.no_grad()
def evaluate(model: nn.Module, data: DatasetDict, task: TaskInfo, tokenizer: Any, *, batch_size: int,
             device: torch.device, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Official metrics of `model` on every dev split, plus the mean cross-entropy / MSE (`eval/loss`).

    Each rank scores its shard; predictions are gathered and de-duplicated by example id (the sampler
    pads shards to equal length), so the result is that of the full split on every rank.
    """
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        for split in task.dev_splits:
            loader = make_dataloader(data[split], tokenizer, batch_size, rank=rank, world_size=world_size)
            ids, logits, labels = [], [], []
            for batch in loader:
                inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
                ids.append(batch["idx"])
                logits.append(model(**inputs).logits.float().cpu())
                labels.append(batch["label"])
            local = (torch.cat(ids).numpy(), torch.cat(logits).numpy(), torch.cat(labels).numpy()) if ids else None
            by_id: dict[int, tuple[np.ndarray, Any]] = {}
            for part in gather_objects(local):
                if part is None:
                    continue
                for i, row, gold in zip(*part):
                    by_id[int(i)] = (row, gold)
            order = sorted(by_id)
            preds = np.stack([by_id[i][0] for i in order])
            gold = np.array([by_id[i][1] for i in order])
            for name, value in compute_metrics(task, preds, gold).items():
                out[task.eval_metric_key(split, name)] = value
            if split == task.dev_splits[0]:
                out[EVAL_LOSS] = _loss(preds, gold, task.is_regression)
    finally:
        model.train(was_training)
    return out


def _loss(logits: np.ndarray, gold: np.ndarray, regression: bool) -> float:
    x = torch.from_numpy(logits).double()
    if regression:
        return float(torch.nn.functional.mse_loss(x.reshape(-1), torch.from_numpy(gold).double()))
    return float(torch.nn.functional.cross_entropy(x, torch.from_numpy(gold).long()))


def is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best

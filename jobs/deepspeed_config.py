"""The `deepspeed:` section of a job spec and the DeepSpeed config generated from it.

The job generates the keys it owns (batch sizes, accumulation, clipping, ZeRO stage/offload, precision)
from `training:` and `deepspeed:`; the raw `deepspeed.config` JSON is merged in around them. A raw value
that contradicts a generated one is an error naming both, never silently overridden; "auto" defers to the
job. Optimizer and scheduler are the job's own and may not come from the raw config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from jobs.specbase import Bool, Int, StrictModel, raise_if

__all__ = ["DeepSpeedSpec", "config_conflicts", "generated_config", "merge_config"]

# DeepSpeed keys the job builds itself from training.* and must not come from the raw config.
_DS_RESERVED = {"optimizer": "the job builds the optimizer from training.learning_rate/weight_decay",
                "scheduler": "the job builds the schedule from training.warmup_ratio"}


class DeepSpeedSpec(StrictModel):
    """DeepSpeed settings. zero_stage defaults to 0 (plain data parallel): right on CPU and for small
    students; use 2 or 3 (+ offload_optimizer) for large models on GPUs. `config` is raw DeepSpeed JSON
    merged into the generated config; a raw value contradicting a generated one is an error."""

    zero_stage: Int = Field(0, ge=0, le=3)
    offload_optimizer: Bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedSpec:
        problems = []
        if self.offload_optimizer and self.zero_stage == 0:
            problems.append(("offload_optimizer", "needs zero_stage >= 1"))
        for key, why in _DS_RESERVED.items():
            if key in self.config:
                problems.append((f"config.{key}", f"not allowed: {why}"))
        raise_if(problems)
        return self


# Generated DeepSpeed key -> the spec key it comes from (named in conflict messages).
_DS_ORIGIN = {
    "train_batch_size": "training.batch_size",
    "train_micro_batch_size_per_gpu": "training.batch_size / (world_size x training.grad_accumulation)",
    "gradient_accumulation_steps": "training.grad_accumulation",
    "gradient_clipping": "training.grad_clip",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
    "bf16.enabled": "deepspeed.precision",
    "fp16.enabled": "deepspeed.precision",
}


def generated_config(ds: DeepSpeedSpec, *, batch_size: int, grad_accumulation: int, grad_clip: float,
                     world_size: int | None) -> dict[str, Any]:
    """The keys the job sets itself, from `training.batch_size/grad_accumulation/grad_clip` and `ds`.

    Args:
        ds: the `deepspeed:` section.
        batch_size: the global effective batch (training.batch_size).
        grad_accumulation: training.grad_accumulation.
        grad_clip: training.grad_clip.
        world_size: processes; None leaves out the per-process micro batch (validation before launch).
    """
    ours: dict[str, Any] = {
        "train_batch_size": batch_size,
        "gradient_accumulation_steps": grad_accumulation,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
    }
    if world_size is not None:
        ours["train_micro_batch_size_per_gpu"] = batch_size // (world_size * grad_accumulation)
    if ds.zero_stage >= 1:
        ours["zero_optimization"]["offload_optimizer"] = {"device": "cpu" if ds.offload_optimizer else "none"}
    return ours


def config_conflicts(raw: Mapping[str, Any], ours: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Raw keys whose value differs from ours ("auto" defers to ours); nested mappings compared key by key."""
    out = []
    for key, value in ours.items():
        if key not in raw:
            continue
        dotted = f"{prefix}{key}"
        theirs = raw[key]
        if isinstance(value, Mapping):
            if isinstance(theirs, Mapping):
                out += config_conflicts(theirs, value, f"{dotted}.")
            else:
                out.append((dotted, f"expected a mapping (the job sets {json.dumps(value)}), got {theirs!r}"))
        elif theirs != "auto" and (theirs != value or isinstance(theirs, bool) != isinstance(value, bool)):
            origin = _DS_ORIGIN.get(dotted, "the spec")
            out.append((dotted, f"raw value {theirs!r} conflicts with {value!r} set from {origin}; "
                                f"remove it, set it to 'auto', or change {origin.split(' ')[0]}"))
    return out


def merge_config(raw: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, Any]:
    """`raw` with `ours` merged in (ours wins; nested mappings merged key by key), as a new plain mapping."""
    merged = json.loads(json.dumps(raw))  # a deep copy of plain JSON data
    for key, value in ours.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = value
    return merged

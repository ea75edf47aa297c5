"""The term interface and its registry (each kind's name and options: ckd.catalog)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..alignment import LayerMap, LayerSpec, resolve_layers
from ..catalog import KINDS, Options
from ..features import Features, FeatureNeeds, Needs, ModelShape, TaskShape

_REGISTRY: dict[str, type["Term"]] = {}


@dataclass
class Targets:
    """Supervision that some terms read besides the two models' features.

    labels: (B,) class ids, or floats for regression. example_ids: (B,) row ids in the training set
    (CoDIR's memory bank is indexed by them).
    """

    labels: Tensor | None = None
    example_ids: Tensor | None = None


class Term(nn.Module):
    """One weighted loss term. Subclasses set `kind`, `Options`, `needs` and implement `forward`;
    `kind` and `Options` are the ones ckd.catalog lists (what a configuration is checked against).

    A term is built once the shapes of both models and the task are known, so that everything that
    can be wrong with its options is found before the first batch.
    """

    kind: ClassVar[str]
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: Options, student: ModelShape, teacher: ModelShape, task: TaskShape) -> None:
        super().__init__()
        self.options = options
        self.student_shape = student
        self.teacher_shape = teacher
        self.task = task

    @property
    def weight(self) -> float:
        return self.options.weight

    def needs(self) -> Needs:
        raise NotImplementedError

    def forward(self, student: Features, teacher: Features, targets: Targets) -> Tensor:
        raise NotImplementedError

    def resolve(self, spec: LayerSpec) -> LayerMap:
        return resolve_layers(spec, self.student_shape.num_layers, self.teacher_shape.num_layers)


def register(cls: type[Term]) -> type[Term]:
    """Register a term class; its kind and Options must be the catalog's (so checking a config without
    torch, against the catalog, accepts exactly what building it accepts)."""
    if cls.kind in _REGISTRY:
        raise RuntimeError(f"loss term {cls.kind!r} is registered twice")
    if cls.kind not in KINDS:
        raise RuntimeError(f"loss term {cls.kind!r} is not in ckd.catalog.KINDS: add it there")
    if KINDS[cls.kind] is not cls.Options:
        raise RuntimeError(
            f"loss term {cls.kind!r} has Options {cls.Options.__name__}, ckd.catalog.KINDS says {KINDS[cls.kind].__name__}"
        )
    _REGISTRY[cls.kind] = cls
    return cls


def check_registry_complete() -> None:
    """Every kind of the catalog has a registered term (called once every term module is imported)."""
    missing = sorted(set(KINDS) - set(_REGISTRY))
    if missing:
        raise RuntimeError(f"ckd.catalog.KINDS lists loss terms with no registered Term class: {', '.join(missing)}")


def registry() -> dict[str, type[Term]]:
    return dict(_REGISTRY)


def require(condition: bool, key: str, message: str) -> None:
    """Raise the ValueError("key: message") form that the builder turns into a keyed config error."""
    if not condition:
        raise ValueError(f"{key}: {message}")


def relation_float(t: Tensor) -> Tensor:
    """Relations run in float32 or better even when the model runs in bf16/fp16."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def hidden_state_needs(layer_map) -> Needs:
    """Needs of a term that reads the hidden states of the mapped layers on both sides."""
    return Needs(
        student=FeatureNeeds(hidden_states=frozenset(s for s, _ in layer_map)),
        teacher=FeatureNeeds(hidden_states=frozenset(t for _, t in layer_map)),
    )


def cls_vectors(features: Features, layers: Any) -> Tensor:
    """First-token vectors of the given hidden-state layers, concatenated: (B, len(layers) * d)."""
    return torch.cat([relation_float(features.hidden_states[l][:, 0]) for l in layers], dim=-1)


def masked_token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of per-token values (B, n) over valid tokens; 0 when there are none."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)

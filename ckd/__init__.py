"""The distillation loss core (torch only): CKD, CoDIR, MLKD-BERT and classic baselines.

Every public name is loaded on first use (PEP 562), so that the torch-free part (ckd.config,
ckd.catalog, ckd.errors, ckd.alignment, ckd.presets) can be imported without torch: `plan` and spec
validation check an objective's configuration with `ckd.config.resolve_terms` alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .alignment import LayerMap, emb_skip, resolve_layers, uniform
    from .config import resolve_terms
    from .errors import ObjectiveConfigError
    from .features import FeatureNeeds, Features, ModelShape, Needs, TaskShape
    from .objective import Objective, build_objective
    from .presets import ckd_paper, ckd_paper_training
    from .terms import Targets, Term, registry

# public name -> the submodule that defines it (those marked torch import torch)
_SOURCES = {
    "FeatureNeeds": "features",  # torch
    "Features": "features",  # torch
    "LayerMap": "alignment",
    "ModelShape": "features",  # torch
    "Needs": "features",  # torch
    "Objective": "objective",  # torch
    "ObjectiveConfigError": "errors",
    "TaskShape": "features",  # torch
    "Targets": "terms",  # torch
    "Term": "terms",  # torch
    "build_objective": "objective",  # torch
    "ckd_paper": "presets",
    "ckd_paper_training": "presets",
    "emb_skip": "alignment",
    "registry": "terms",  # torch
    "resolve_layers": "alignment",
    "resolve_terms": "config",
    "uniform": "alignment",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

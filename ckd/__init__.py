"""The distillation loss core (torch only): CKD, CoDIR, MLKD-BERT and classic baselines."""

from .alignment import LayerMap, emb_skip, resolve_layers, uniform
from .errors import ObjectiveConfigError
from .features import FeatureNeeds, Features, ModelShape, Needs, TaskShape
from .objective import Objective, build_objective, resolve_terms
from .presets import ckd_paper, ckd_paper_training
from .terms import Targets, Term, registry

__all__ = [
    "FeatureNeeds",
    "Features",
    "LayerMap",
    "ModelShape",
    "Needs",
    "Objective",
    "ObjectiveConfigError",
    "TaskShape",
    "Targets",
    "Term",
    "build_objective",
    "ckd_paper",
    "ckd_paper_training",
    "emb_skip",
    "registry",
    "resolve_layers",
    "resolve_terms",
    "uniform",
]

"""The objective: the weighted sum of registered terms that a configuration describes.

The configuration's format, and its torch-free check, are in ckd.config (`resolve_terms`); this
module builds the terms once both models' shapes and the task are known.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .config import resolve_terms
from .errors import ObjectiveConfigError
from .features import Features, ModelShape, Needs, TaskShape
from .options import parse_options
from .terms import Targets, Term, registry

__all__ = ["Objective", "build_objective", "resolve_terms"]


class Objective(nn.Module):
    """Weighted sum of terms. Its parameters and buffers (projections, memory banks) are the
    trainable, checkpointed state that belongs to the loss and not to the exported student."""

    def __init__(self, terms: Mapping[str, Term]) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(dict(terms))

    @property
    def needs(self) -> Needs:
        """Which features each model must provide (the union over terms)."""
        needs = Needs()
        for term in self.terms.values():
            needs = needs | term.needs()
        return needs

    def trainable_modules(self) -> nn.ModuleDict:
        return self.terms

    def forward(
        self,
        student: Features,
        teacher: Features,
        labels: Tensor | None = None,
        example_ids: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the total loss and every term's unweighted value (detached), by term name."""
        targets = Targets(labels=labels, example_ids=example_ids)
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        for name, term in self.terms.items():
            value = term(student, teacher, targets)
            parts[name] = value.detach()
            weighted = term.weight * value.float()
            total = weighted if total is None else total + weighted
        if total is None:
            raise ValueError("the objective has no terms")
        return total, parts


def build_objective(
    config: Mapping[str, Any], student: ModelShape, teacher: ModelShape, task: TaskShape
) -> Objective:
    """Build the objective for these two models and this task.

    Raises:
        ObjectiveConfigError: naming the key (e.g. "terms.wr_pair.layers") of the first problem.
    """
    known = registry()
    terms: dict[str, Term] = {}
    for name, options in resolve_terms(config).items():
        options = dict(options)
        cls = known[options.pop("kind")]
        parsed = parse_options(cls.Options, options, f"terms.{name}")
        try:
            terms[name] = cls(parsed, student, teacher, task)
        except ValueError as err:
            key, sep, message = str(err).partition(": ")
            if sep and " " not in key:
                raise ObjectiveConfigError(f"terms.{name}.{key}", message) from None
            raise ObjectiveConfigError(f"terms.{name}", str(err)) from None
    return Objective(terms)

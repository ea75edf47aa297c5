"""The declarative objective: a weighted sum of registered terms built from a plain mapping.

    objective:
      preset: ckd-paper        # optional; needs `task`
      task: sst2
      terms:
        ce: {weight: 1}
        logit_kd: {weight: 1, temperature: 4}
        wr_angle: {weight: 1000, window: 21}
        extra_angle: {kind: ltr_angle, weight: 1}   # a second instance of a kind

Each entry of `terms` is a term instance; its kind is `kind:` or, by default, its name. Terms named
in a preset are merged key by key with the user's entries; `weight: 0` drops a preset's term.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .errors import ObjectiveConfigError
from .features import Features, ModelShape, Needs, TaskShape
from .options import parse_options
from .presets import expand_preset
from .terms import Targets, Term, registry

_TOP_LEVEL_KEYS = ("preset", "task", "terms")


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


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for name, options in override.items():
        if isinstance(options, Mapping) and isinstance(merged.get(name), Mapping):
            merged[name] = {**merged[name], **options}
        else:
            merged[name] = options
    return merged


def resolve_terms(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Check the config's structure and return {term name: options incl. kind}, preset expanded.

    Needs no model: this is what `plan` and spec validation call before anything is loaded.
    """
    if not isinstance(config, Mapping):
        raise ObjectiveConfigError("", f"expected a mapping with keys {', '.join(_TOP_LEVEL_KEYS)}, got {type(config).__name__}")
    unknown = sorted(set(config) - set(_TOP_LEVEL_KEYS))
    if unknown:
        raise ObjectiveConfigError(unknown[0], f"unknown key; valid keys are: {', '.join(_TOP_LEVEL_KEYS)}")
    user_terms = config.get("terms") or {}
    if not isinstance(user_terms, Mapping):
        raise ObjectiveConfigError("terms", "expected a mapping of term name -> options")
    terms: dict[str, Any] = {}
    if config.get("preset") is not None:
        terms = expand_preset(config["preset"], config.get("task"))
    terms = _merge(terms, user_terms)
    known = registry()
    resolved: dict[str, dict[str, Any]] = {}
    for name, options in terms.items():
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise ObjectiveConfigError(f"terms.{name}", f"expected a mapping of options, got {options!r}")
        options = dict(options)
        kind = options.pop("kind", name)
        if kind not in known:
            raise ObjectiveConfigError(
                f"terms.{name}" + (".kind" if kind != name else ""),
                f"unknown loss term {kind!r}; known terms: {', '.join(sorted(known))}",
            )
        parse_options(known[kind].Options, options, f"terms.{name}")
        if options.get("weight", 1.0) == 0:
            continue
        resolved[name] = {"kind": kind, **options}
    if not resolved:
        raise ObjectiveConfigError("terms", "the objective has no term with a non-zero weight")
    return resolved


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

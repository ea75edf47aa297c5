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

This module checks such a mapping without torch (against ckd.catalog), and with the two models' depths
(`check_depths`: every layer map and layer list of every term); ckd.objective builds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .alignment import resolve_layer_list, resolve_layers
from .catalog import catalog
from .errors import ObjectiveConfigError
from .options import parse_options
from .presets import expand_preset

_TOP_LEVEL_KEYS = ("preset", "task", "terms")


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

    Needs no model (and no torch): this is what `plan` and spec validation call before anything is loaded.
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
    known = catalog()
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
        parse_options(known[kind], options, f"terms.{name}")
        if options.get("weight", 1.0) == 0:
            continue
        resolved[name] = {"kind": kind, **options}
    if not resolved:
        raise ObjectiveConfigError("terms", "the objective has no term with a non-zero weight")
    return resolved


def check_depths(config: Mapping[str, Any], n_student: int | None, n_teacher: int | None) -> None:
    """Every term's layer options against the models' depths (transformer layers; None: unknown, not
    checked), as `build_objective` will resolve them, without torch.

    Raises:
        ObjectiveConfigError: `terms.<name>.<option>` and what is out of range (both depths named).
    """
    known = catalog()
    for name, options in resolve_terms(config).items():
        kind = options["kind"]
        parsed = parse_options(known[kind], {k: v for k, v in options.items() if k != "kind"}, f"terms.{name}")
        depths = f" (student: {n_student} layers, teacher: {n_teacher} layers)"
        try:
            if n_student is not None and n_teacher is not None and hasattr(parsed, "layers"):
                resolve_layers(parsed.layers, n_student, n_teacher)
            if n_student is not None and hasattr(parsed, "student_layers"):
                resolve_layer_list(parsed.student_layers, n_student, "student_layers")
            if n_teacher is not None and hasattr(parsed, "teacher_layers"):
                resolve_layer_list(parsed.teacher_layers, n_teacher, "teacher_layers")
            layer = getattr(parsed, "teacher_layer", None)
            if n_teacher is not None and layer is not None and layer > n_teacher:
                raise ValueError(f"teacher_layer: layer {layer} is out of range 1..{n_teacher}")
        except ValueError as err:
            key, _, message = str(err).partition(": ")
            raise ObjectiveConfigError(f"terms.{name}.{key}", message + depths) from None

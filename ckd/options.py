"""Strict parsing of term options: dataclasses in, unknown keys and bad types out, with the key named."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from .errors import ObjectiveConfigError

T = TypeVar("T")


def _type_matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if annotation is type(None):
        return value is None
    if annotation is float:  # finite: .inf and .nan are never a weight, temperature or margin
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if annotation is float:
        return "a finite float"
    return getattr(annotation, "__name__", str(annotation))


def parse_options(cls: type[T], raw: Mapping[str, Any] | None, where: str) -> T:
    """Build the options dataclass `cls` from a mapping, rejecting unknown keys and wrong types.

    `cls.__post_init__` may raise ValueError("key: message") to reject a value; the key is then
    prefixed with `where` so the error names the full path.
    """
    raw = dict(raw or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ObjectiveConfigError(
            f"{where}.{unknown[0]}", f"unknown option; valid options are: {', '.join(sorted(fields))}"
        )
    for name, value in raw.items():
        if not _type_matches(value, hints[name]):
            raise ObjectiveConfigError(f"{where}.{name}", f"expected {_describe(hints[name])}, got {value!r}")
    try:
        return cls(**raw)
    except ValueError as err:
        key, _, message = str(err).partition(": ")
        if key in fields:
            raise ObjectiveConfigError(f"{where}.{key}", message) from None
        raise ObjectiveConfigError(where, str(err)) from None

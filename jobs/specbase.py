"""The strict-config kernel every config file of the project is read with (job specs, grids, cluster blocks).

- `read_yaml_mapping`: YAML with line numbers, duplicate keys rejected, `3e-5` read as a float, and bounded
  (`MAX_CONFIG_BYTES`, UTF-8 only, nesting up to `MAX_YAML_DEPTH`, aliases expanding to at most
  `MAX_YAML_NODES` nodes: no alias bomb, no RecursionError);
- `apply_overrides`: `dotted.key=value` overrides (values parsed as YAML) and `set_dotted`, the one walk
  that sets a dotted key inside nested mappings;
- `Int`, `Float`, `Bool`: numbers and flags that refuse strings and booleans-for-numbers (`epochs: "2"`,
  `epochs: true`); every float of a `StrictModel` must be finite;
- `StrictModel`: pydantic models where an unknown key is an error; validators raise `Problems([(relative
  key, message), ...])` to report at sub-keys;
- `validation_issues` / `key_messages`: a pydantic error as "file:line: dotted.key: message" lines, with
  "did you mean" and the valid keys on an unknown key; `SpecError` carries them all at once.

It imports only pydantic and yaml, so a light command (`status`, `plan` of a remote backend) and every
cluster config can use it without loading torch.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Strict, ValidationError, ValidationInfo

__all__ = [
    "MAX_CONFIG_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "Bool", "Float", "Int",
    "Problems", "SpecError", "SpecIssue", "StrictModel", "apply_overrides", "base_dir", "dotted_key",
    "key_messages", "line_of", "parse_value", "raise_if", "read_yaml_mapping", "resolve_path", "set_dotted",
    "unwrap_model", "validation_issues",
]  # fmt: skip


# --------------------------------------------------------------------------------------------- errors


class SpecIssue(typing.NamedTuple):
    """One problem: where (file, 1-based line or None, dotted key) and what was expected."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class SpecError(ValueError):
    """An invalid job spec. `issues` lists every problem; the message has one line per problem,
    each "file:line: dotted.key: message"."""

    def __init__(self, issues: Sequence[SpecIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class Problems(ValueError):
    """Raised inside validators to report problems at sub-keys of the validated object.

    Pydantic keeps the exception in the error's ctx, so `key_messages` can extend the location by each
    problem's relative key (pydantic alone would put a model validator's error on the whole model).
    """

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{k}: {m}" if k else m for k, m in self.problems))


def raise_if(problems: list[tuple[str, str]]) -> None:
    """Raise `Problems` when there are any (inside a validator)."""
    if problems:
        raise Problems(problems)



# --------------------------------------------------------------------------------------------- paths


def base_dir(info: ValidationInfo) -> Path:
    """The directory relative paths are resolved against (validation context `base_dir`, else the cwd)."""
    ctx = info.context or {}
    return Path(ctx.get("base_dir") or Path.cwd())


def resolve_path(value: Any, info: ValidationInfo) -> Any:
    """A path value made absolute against `base_dir` (`~` expanded); other values unchanged."""
    if isinstance(value, (str, Path)) and str(value):
        path = Path(os.path.expanduser(str(value)))
        return path if path.is_absolute() else (base_dir(info) / path).resolve()
    return value


# ----------------------------------------------------------------------------------------------- models


def _no_text_or_flag(kind: str) -> Any:
    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected {kind}, got {str(value).lower()} (a boolean)")
        if isinstance(value, (str, bytes)):
            raise ValueError(f"expected {kind}, got the string {_short(value)}; write the number without quotes")
        return value
    return BeforeValidator(check)


# An integer (an integral float such as a quantised sample's 16.0 still reads as 16), never a string or a bool.
Int = Annotated[int, _no_text_or_flag("an integer")]
# A finite number (YAML ints welcome), never a string or a bool.
Float = Annotated[float, _no_text_or_flag("a number")]
# true or false, never 1, "yes" or "true".
Bool = Annotated[bool, Strict()]


class StrictModel(BaseModel):
    """A config model where an unknown key is an error and every float is finite (no .inf, no .nan)."""

    model_config = ConfigDict(extra="forbid", validate_default=False, arbitrary_types_allowed=False,
                              allow_inf_nan=False)


# ------------------------------------------------------------------------------------------------ YAML

# A config file larger than this is refused before it is parsed (a grid or job spec is a few KB).
MAX_CONFIG_BYTES = 1 << 20
# Nested mappings/lists deeper than this are refused (PyYAML composes recursively: 3,000 nested brackets
# would be a RecursionError); a job spec is about 6 levels deep.
MAX_YAML_DEPTH = 64
# The document's nodes once every alias is expanded: an alias bomb (`b: [*a, *a, ...]`, nine levels of
# nine) would otherwise take minutes and gigabytes in everything that walks the data.
MAX_YAML_NODES = 100_000


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _LimitExceeded(yaml.MarkedYAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `3e-5` as a float (YAML 1.2; PyYAML's 1.1 rules make it a string) and
    rejects duplicate keys, nesting deeper than `MAX_YAML_DEPTH` and aliases that expand beyond
    `MAX_YAML_NODES` nodes (or into themselves)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _LimitExceeded(problem=f"nested more than {MAX_YAML_DEPTH} levels deep "
                                             f"(jobs.specbase.MAX_YAML_DEPTH)",
                                     problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expanded(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)  # `<<: *defaults` merge keys, as SafeLoader reads them
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise _DuplicateKey(problem=f"duplicate key {key!r} (first on line {seen[key]})",
                                    problem_mark=key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _check_expanded(root: yaml.Node) -> None:
    """Refuse a node graph whose aliases expand beyond MAX_YAML_NODES nodes or MAX_YAML_DEPTH levels, or
    that contains itself (`&a [*a]`). Shared nodes are measured once, so this is linear in the text."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, height)
    active: set[int] = set()

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:
        problem = None
        if id(node) in active:
            problem = "an alias refers to the collection that contains it (a recursive structure)"
        elif id(node) not in sizes and depth <= MAX_YAML_DEPTH:
            active.add(id(node))
            size, height = 1, 0
            children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
                node.value if isinstance(node, yaml.SequenceNode) else []
            for child in children:
                child_size, child_height = measure(child, depth + 1)
                size, height = size + child_size, max(height, child_height + 1)
                if size > MAX_YAML_NODES:
                    problem = (f"aliases expand the document beyond {MAX_YAML_NODES:,} values "
                               f"(jobs.specbase.MAX_YAML_NODES; a YAML alias bomb?): write the values out")
                    break
            active.discard(id(node))
            sizes[id(node)] = (size, height)
        if problem is None and depth + sizes.get(id(node), (0, 0))[1] > MAX_YAML_DEPTH:
            problem = f"aliases nest the data more than {MAX_YAML_DEPTH} levels deep (jobs.specbase.MAX_YAML_DEPTH)"
        if problem:
            raise _LimitExceeded(problem=problem, problem_mark=node.start_mark)
        return sizes[id(node)]

    measure(root, 1)


def _key_lines(node: yaml.Node | None, prefix: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """Dotted key (list items as key[i]) -> 1-based line of the key (of the item for list items)."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                dotted = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                out.setdefault(dotted, key_node.start_mark.line + 1)
                _key_lines(value_node, dotted, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            dotted = f"{prefix}[{i}]"
            out.setdefault(dotted, item.start_mark.line + 1)
            _key_lines(item, dotted, out)
    return out


def line_of(lines: Mapping[str, int], key: str) -> int | None:
    """Line of `key`, else of its nearest ancestor present in the file."""
    while key:
        if key in lines:
            return lines[key]
        cut = max(key.rfind("."), key.rfind("["))
        key = key[:cut] if cut > 0 else ""
    return None



def _parse_yaml(text: str, file: str) -> tuple[Any, dict[str, int]]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else None
        what = " ".join(p for p in (err.context, err.problem) if p)
        kind = "YAML refused" if isinstance(err, _LimitExceeded) else "YAML syntax error"
        raise SpecError([SpecIssue(file, line, "", f"{kind}: {what}")]) from None
    except RecursionError:  # a safety net: MAX_YAML_DEPTH stops nesting well before this
        raise SpecError([SpecIssue(file, None, "", "YAML refused: nested too deeply")]) from None
    except yaml.YAMLError as err:
        raise SpecError([SpecIssue(file, None, "", f"YAML error: {err}")]) from None
    finally:
        loader.dispose()
    return data, _key_lines(node)


# ------------------------------------------------------------------------------------------- overrides


def parse_value(raw: str) -> Any:
    """A value written as YAML text (`3e-5`, `[0, 5]`, `{k: v}`); blank text is None.

    Raises:
        yaml.YAMLError: the text is not valid YAML.
    """
    return yaml.load(raw, Loader=_Loader) if raw.strip() else None


def set_dotted(data: dict[str, Any], key: str, value: Any) -> str | None:
    """Set `a.b.c` in nested mappings, creating missing ones; the problem (a non-mapping on the path) or None."""
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return f"{'.'.join(parts[: depth + 1])} is {child!r}, not a mapping"
        node = child
    node[parts[-1]] = value
    return None


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str], file: str = "<spec>") -> tuple[dict[str, Any], dict[str, str]]:
    """Apply `a.b.c=value` overrides (value parsed as YAML: scalars, `[0, 5]`, `{k: v}`) to a copy of data.

    Returns:
        (new data, {dotted key: override text}).

    Raises:
        SpecError: a malformed override, or one whose path runs through a non-mapping value.
    """
    data = json.loads(json.dumps(data, default=str)) if data else {}
    issues: list[SpecIssue] = []
    applied: dict[str, str] = {}
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p for p in parts):
            issues.append(SpecIssue(file, None, key, f"bad override {text!r}: expected dotted.key=value"))
            continue
        try:
            value = parse_value(raw)
        except yaml.YAMLError as err:
            issues.append(SpecIssue(file, None, key, f"override {text!r}: value is not valid YAML ({err})"))
            continue
        problem = set_dotted(data, key, value)
        if problem:
            issues.append(SpecIssue(file, None, key, f"override {text!r}: {problem}"))
        else:
            applied[key] = text
    if issues:
        raise SpecError(issues)
    return data, applied




# --------------------------------------------------------------------------------------------- loading


def _decode(raw: bytes, file: str, what: str) -> str:
    """The file's text as UTF-8 (a BOM is dropped); SpecError naming the line of the first bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise SpecError([SpecIssue(file, line, "", f"the {what} is not UTF-8 text: byte 0x{raw[err.start]:02x} at "
                                                   f"column {column} (Latin-1?); save the file as UTF-8")]) from None


def read_yaml_mapping(path: str | Path, what: str = "spec") -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YAML file whose top level is a mapping (an empty file reads as {}).

    Returns:
        (data, {dotted key: 1-based line}); list items are keyed `key[i]`.

    Raises:
        SpecError: the file is missing or unreadable, bad YAML (incl. duplicate keys), or not a mapping;
            `what` names the file's role in the message ("job spec file not found").
    """
    path = Path(path)
    file = str(path)
    try:
        if path.is_dir():
            raise SpecError([SpecIssue(file, None, "", f"the {what} is a directory, not a YAML file")])
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise SpecError([SpecIssue(file, None, "", f"{what} file not found")]) from None
    except OSError as err:
        raise SpecError([SpecIssue(file, None, "", f"cannot read the {what}: {err.strerror or err}")]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise SpecError([SpecIssue(file, None, "", f"the {what} file is larger than {MAX_CONFIG_BYTES:,} bytes "
                                                   f"(jobs.specbase.MAX_CONFIG_BYTES): not a config file?")])
    text = _decode(raw, file, what)
    data, lines = _parse_yaml(text, file)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SpecError([SpecIssue(file, 1, "", f"expected a mapping of sections at the top level, "
                                                f"got {type(data).__name__}")])
    return dict(data), lines



# ------------------------------------------------------------------------------- pydantic -> SpecIssue


def _model_at(loc: Sequence[Any], root: type[BaseModel]) -> type[BaseModel] | None:
    """The model class validating the mapping at `loc` (for listing valid keys), or None."""
    model: Any = root
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        if isinstance(part, int):  # an item of a list of models
            continue
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None)
        if field is None:
            return None
        model = unwrap_model(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def unwrap_model(annotation: Any) -> Any:
    """The pydantic model class inside an annotation (`X | None`, `list[X]`, ...), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = unwrap_model(arg)
        if found is not None:
            return found
    return None


def dotted_key(loc: Sequence[Any]) -> str:
    """A pydantic error location as a key: `a.b[0].c`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part:
            out += f".{part}" if out else str(part)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validation_issues(err: ValidationError, *, root: type[BaseModel], file: str,
                      lines: Mapping[str, int] | None = None,
                      overridden: Mapping[str, str] | None = None) -> list[SpecIssue]:
    """A pydantic error of `root.model_validate(...)` as SpecIssues ("file:line: dotted.key: message"),
    the way `JobSpec.from_mapping` reports its own.

    Args:
        err: raised by validating a model of this module's style (`StrictModel`, `Problems`).
        file: named in every issue.
        lines: dotted key -> 1-based line.
        overridden: dotted key -> the override that set it, named instead of a line.
        root: the validated model class (lists the valid keys on an unknown key).
    """
    return _issues_from(err, file, lines or {}, overridden or {}, root=root)


def key_messages(err: ValidationError, *, root: type[BaseModel],
                 prefix: Sequence[Any] = ()) -> list[tuple[str, str]]:
    """A pydantic error as (dotted key, message) pairs, the one wording every config of the project uses.

    Args:
        err: raised by `root.model_validate(...)` (models in this module's style: `StrictModel`, `Problems`),
            or by a model embedding `root` at `prefix`.
        root: the validated model class (an unknown key lists the valid keys there).
        prefix: the location of `root` inside the validated model; keys are made relative to it.
    """
    out: list[tuple[str, str]] = []
    for e in err.errors(include_url=False):
        loc = [p for p in e["loc"] if p != "[key]"][len(prefix):]
        kind = e["type"]
        error = (e.get("ctx") or {}).get("error")
        if isinstance(error, Problems):
            entries = [(loc + ([k] if k else []), m) for k, m in error.problems]
        elif kind == "extra_forbidden":
            model = _model_at(loc[:-1], root)
            valid = sorted(f.alias or n for n, f in model.model_fields.items()) if model else []
            hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            msg = "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            entries = [(loc, msg + (f"; valid keys here: {', '.join(valid)}" if valid else ""))]
        elif kind == "missing":
            entries = [(loc, "required key is missing")]
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if kind not in ("value_error", "assertion_error"):
                msg += f"; got {_short(e.get('input'))}"
            entries = [(loc, msg)]
        out.extend((dotted_key(entry_loc), msg) for entry_loc, msg in entries)
    return out


def _issues_from(err: ValidationError, file: str, lines: Mapping[str, int], overridden: Mapping[str, str],
                 root: type[BaseModel]) -> list[SpecIssue]:
    issues: list[SpecIssue] = []
    for key, msg in key_messages(err, root=root):
        if key in overridden or any(key.startswith(k + ".") for k in overridden):
            origin = overridden.get(key) or next(v for k, v in overridden.items() if key.startswith(k + "."))
            issues.append(SpecIssue(file, None, key, f"{msg} (set by override {origin!r})"))
        else:
            issues.append(SpecIssue(file, line_of(lines, key), key, msg))
    return issues

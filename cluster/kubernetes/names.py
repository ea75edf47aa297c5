"""The Kubernetes name and quantity grammar the `cluster:` block and the RayJob manifest are checked with.

Each `*_error(value)` returns why `value` is not a valid name of its kind, or None: DNS-1123 labels
(namespaces), DNS-1035 labels (RayJob names), DNS-1123 subdomains (PVC, Secret and service-account names),
qualified names and label values (labels, node selectors, toleration keys), and C_IDENTIFIER-like
environment variable names.

Quantities (cpu, memory) follow the Kubernetes quantity grammar (k8s.io/apimachinery resource.Quantity):

    <quantity>        ::= <signedNumber><suffix>
    <suffix>          ::= <binarySI> | <decimalExponent> | <decimalSI>
    <binarySI>        ::= Ki | Mi | Gi | Ti | Pi | Ei
    <decimalSI>       ::= n | u | m | "" | k | M | G | T | P | E
    <decimalExponent> ::= "e" <signedInteger> | "E" <signedInteger>
    <signedNumber>    ::= <number> | <sign><number>
    <number>          ::= <digits> | <digits>.<digits> | <digits>. | .<digits>

Standard library only: the config models (cluster.kubernetes.config) and the manifest check
(cluster.kubernetes.manifest) both use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = [
    "Quantity", "dns1035_label_error", "dns1123_label_error", "dns1123_subdomain_error", "env_name_error",
    "label_problems", "label_value_error", "parse_quantity", "positive_quantity", "qualified_name_error",
]  # fmt: skip


# ------------------------------------------------------------------------------------ name grammar

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


def dns1123_label_error(value: str) -> str | None:
    """Why `value` is not a DNS-1123 label (namespace names), or None."""
    if len(value) > 63:
        return f"{value!r} is longer than 63 characters"
    if not _DNS1123_LABEL.fullmatch(value):
        return (f"{value!r} is not a DNS-1123 label: lower-case letters, digits and '-', starting and ending "
                "with a letter or digit")
    return None


def dns1035_label_error(value: str) -> str | None:
    """Why `value` is not a DNS-1035 label (a DNS-1123 label that starts with a letter), or None."""
    if len(value) > 63:
        return f"{value!r} is longer than 63 characters"
    if not _DNS1035_LABEL.fullmatch(value):
        return (f"{value!r} is not a DNS-1035 label: lower-case letters, digits and '-', starting with a "
                "letter and ending with a letter or digit")
    return None


def dns1123_subdomain_error(value: str) -> str | None:
    """Why `value` is not a DNS-1123 subdomain (names of most objects: PVCs, Secrets, ...), or None."""
    if len(value) > 253:
        return f"{value!r} is longer than 253 characters"
    if not value or not all(_DNS1123_LABEL.fullmatch(part) for part in value.split(".")):
        return (f"{value!r} is not a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', starting and "
                "ending with a letter or digit")
    return None


def qualified_name_error(value: str) -> str | None:
    """Why `value` is not a qualified name ([prefix/]name: label and annotation keys), or None."""
    prefix, slash, name = value.rpartition("/")
    if slash and (not prefix or dns1123_subdomain_error(prefix)):
        return f"{value!r}: the prefix before '/' must be a DNS-1123 subdomain"
    if not name or len(name) > 63 or not _QUALIFIED_NAME.fullmatch(name):
        return (f"{value!r} is not a qualified name: at most 63 letters, digits, '-', '_' or '.', starting and "
                "ending with a letter or digit, with an optional DNS subdomain prefix and '/'")
    return None


def label_value_error(value: str) -> str | None:
    """Why `value` is not a label value (empty, or a name part of at most 63 characters), or None."""
    if value and (len(value) > 63 or not _QUALIFIED_NAME.fullmatch(value)):
        return (f"{value!r} is not a label value: at most 63 letters, digits, '-', '_' or '.', starting and "
                "ending with a letter or digit")
    return None


def env_name_error(value: str) -> str | None:
    """Why `value` is not a valid container environment variable name, or None."""
    if not _ENV_NAME.fullmatch(value):
        return (f"{value!r} is not a valid environment variable name (letters, digits, '_', '-', '.'; not "
                "starting with a digit)")
    return None


# ---------------------------------------------------------------------------------------- quantities

_BINARY_SI = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SI = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


@dataclass(frozen=True)
class Quantity:
    """A parsed Kubernetes quantity: `text` as written, `value` in base units (cores, bytes)."""

    text: str
    value: Decimal

    def __str__(self) -> str:
        return self.text


def parse_quantity(text: str) -> Quantity:
    """Parse a Kubernetes quantity ("500m", "4", "1.5", "16Gi", "1e3", "+2k").

    Raises:
        ValueError: the text does not follow the quantity grammar (see the module docstring).
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a quantity string; got {text!r}")
    pos, end = 0, len(text)
    if pos < end and text[pos] in "+-":
        pos += 1
    start = pos
    while pos < end and text[pos].isdigit() and text[pos].isascii():
        pos += 1
    int_digits = pos - start
    frac_digits = 0
    if pos < end and text[pos] == ".":
        pos += 1
        frac_start = pos
        while pos < end and text[pos].isdigit() and text[pos].isascii():
            pos += 1
        frac_digits = pos - frac_start
    if int_digits + frac_digits == 0:
        raise ValueError(f"{text!r} is not a Kubernetes quantity: expected a number such as 500m, 4, 1.5 or 16Gi")
    number, suffix = text[:pos], text[pos:]
    try:
        value = Decimal(number if number not in "+-" else "0")
    except InvalidOperation:  # pragma: no cover - the scanner only lets valid numbers through
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from None
    if suffix in _BINARY_SI:
        return Quantity(text, value * _BINARY_SI[suffix])
    if suffix in _DECIMAL_SI:
        return Quantity(text, value.scaleb(_DECIMAL_SI[suffix]))
    if suffix[:1] in ("e", "E") and re.fullmatch(r"[+-]?[0-9]+", suffix[1:]):
        return Quantity(text, value.scaleb(int(suffix[1:])))
    valid = ", ".join([*_BINARY_SI, *(s for s in _DECIMAL_SI if s)])
    raise ValueError(f"{text!r} is not a Kubernetes quantity: unknown suffix {suffix!r} (valid: {valid}, "
                     "none, or an exponent like e3)")


def positive_quantity(value: Any, *, what: str, integral_bytes: bool = False) -> str:
    """Validate a positive quantity; YAML numbers (4, 0.5) become their text. Returns the text."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        example = "16Gi" if integral_bytes else "4 or 500m"
        raise ValueError(f"expected a {what} quantity such as {example}; got {value!r}")
    text = value if isinstance(value, str) else repr(value)
    q = parse_quantity(text)
    if q.value <= 0:
        raise ValueError(f"{text!r}: a {what} quantity must be positive")
    if integral_bytes and q.value != q.value.to_integral_value():
        raise ValueError(f"{text!r} is {q.value.normalize()} bytes, not a whole number of bytes "
                         "(the suffix 'm' means milli; did you mean 'Mi' or 'M'?)")
    return text


def label_problems(mapping: Mapping[str, str]) -> list[tuple[str, str]]:
    """(key, why) for each label (or node selector) whose key or value is not valid."""
    problems = []
    for key, value in mapping.items():
        if msg := qualified_name_error(key):
            problems.append((key, msg))
        elif msg := label_value_error(value):
            problems.append((key, msg))
    return problems

"""Variant specs: ``name[:key=value[,key=value...]]`` (DESIGN.md's grammar).

Each pass declares its keys (type, allowed values, default); parsing validates against that
schema and raises a one-line `SpecError` naming the spec, the key and what is allowed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rewriter.errors import SpecError


@dataclass(frozen=True)
class Key:
    """One key of a spec: how to parse its value and what to say when it is wrong."""

    parse: Callable[[str], Any]
    allowed: str  # human description of the allowed values
    default: Any = None
    required: bool = False


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError
    return value


def choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError
        return text

    return parse


def int_set(text: str) -> tuple[int, ...]:
    """``0;2;5-7`` -> (0, 2, 5, 6, 7). Semicolons, because commas separate keys."""
    out: list[int] = []
    for part in text.split(";"):
        lo, dash, hi = part.partition("-")
        if dash:
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    if not out or min(out) < 0:
        raise ValueError
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class Spec:
    name: str
    params: dict = field(default_factory=dict)
    text: str = ""

    def __str__(self) -> str:
        return self.text or self.name


SCHEMAS: dict[str, dict[str, Key]] = {}


def register(name: str, keys: dict[str, Key]) -> None:
    SCHEMAS[name] = keys


def parse_spec(text: str) -> Spec:
    from rewriter import passes  # noqa: F401  (passes register their schemas on import)

    text = text.strip()
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in SCHEMAS:
        raise SpecError(f"unknown variant {name!r} in spec {text!r} "
                        f"(known: {', '.join(sorted(SCHEMAS))})")
    schema = SCHEMAS[name]
    raw: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep:
                raise SpecError(f"spec {text!r}: {item!r} is not key=value")
            if key not in schema:
                raise SpecError(f"spec {text!r}: unknown key {key!r} for {name} "
                                f"(allowed: {', '.join(schema)})")
            if key in raw:
                raise SpecError(f"spec {text!r}: key {key!r} given twice")
            raw[key] = value.strip()
    params: dict[str, Any] = {}
    for key, rule in schema.items():
        if key not in raw:
            if rule.required:
                raise SpecError(f"spec {text!r}: {name} needs {key}= ({rule.allowed})")
            params[key] = rule.default
            continue
        try:
            params[key] = rule.parse(raw[key])
        except (ValueError, TypeError):
            raise SpecError(f"spec {text!r}: {key}={raw[key]!r} is not allowed "
                            f"({rule.allowed})") from None
    return Spec(name, params, text)

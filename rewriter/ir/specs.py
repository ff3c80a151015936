"""The grammar of variant specs, ``name[:key=value[,key=value...]]``: the typed keys a variant
declares (`Key`), the parsed `Spec`, and the value parsers keys share. The variants themselves,
and the parser that checks a spec against their keys, are in rewriter.passes.registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
    metavar: str = "X"  # the value in a usage line: kv-heads=N, merge=mean|fit


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


def grid_shape(text: str) -> tuple[int, ...]:
    """``14x14`` -> (14, 14), ``4x14x14`` -> (4, 14, 14): a token grid, 2-D or 3-D."""
    dims = tuple(int(part) for part in text.lower().split("x"))
    if len(dims) not in (2, 3) or min(dims) < 1:
        raise ValueError
    return dims


def attribute_items(text: str, keys: tuple[str, ...], what: str) -> Iterator[tuple[str, str]]:
    """The ``key=value`` items of a comma-separated op attribute (a mask or top-k sparsity
    string), keys checked: a one-line SpecError naming ``what`` for an unknown item."""
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in keys:
            raise SpecError(f"{what} {text!r}: unknown item {item!r} "
                            f"(allowed keys: {', '.join(keys)})")
        yield key, value.strip()


def attribute_int(text: str, key: str, value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SpecError(f"{what} {text!r}: {key}={value!r} is not an integer") from None

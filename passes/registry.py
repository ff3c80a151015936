"""The one registry of variants: each maps a spec name to its schema (keys with their types,
defaults, allowed values and help) and to its pass class.

A variant is one class in one module of this package, registered with ``@variant(...)``. The
spec parser (`parse_spec`), `rewriter.rewrite`, the CLI's help and the README's table of
variants (`variants_markdown`) all read `VARIANTS`, so a new variant is one new file (imported
by this package's ``__init__``) plus its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rewriter.errors import SpecError
from rewriter.ir.specs import Key, Spec


@dataclass(frozen=True)
class Variant:
    name: str
    keys: dict[str, Key]
    summary: str  # what it does, one sentence
    pass_class: type  # constructed with the parsed Spec; .run(program, ctx) -> PassResult
    usage: tuple[str, ...]  # spec lines, e.g. "gqa:kv-heads=N[,merge=mean|fit]"


VARIANTS: dict[str, Variant] = {}


def variant(name: str, keys: dict[str, Key], summary: str, *, usage: tuple[str, ...] = ()
            ) -> Callable[[type], type]:
    """Class decorator: register the pass class as variant ``name`` (stackable: one class may
    serve several names). ``usage`` defaults to one line built from the keys."""
    def register(cls: type) -> type:
        if name in VARIANTS:
            raise ValueError(f"variant {name!r} is registered twice")
        VARIANTS[name] = Variant(name, keys, summary, cls, usage or (_usage_line(name, keys),))
        return cls

    return register


def _usage_line(name: str, keys: dict[str, Key]) -> str:
    required = [f"{k}={rule.metavar}" for k, rule in keys.items() if rule.required]
    optional = "".join(f"[,{k}={rule.metavar}]" for k, rule in keys.items() if not rule.required)
    if not required and optional:
        optional = "[" + optional[2:]
    return f"{name}:" + ",".join(required) + optional


def parse_spec(text: str) -> Spec:
    """``name[:key=value[,key=value...]]`` checked against the variant's schema; a one-line
    SpecError names the spec, the key and the allowed values."""
    text = text.strip()
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in VARIANTS:
        raise SpecError(f"unknown variant {name!r} in spec {text!r} "
                        f"(known: {', '.join(sorted(VARIANTS))})")
    schema = VARIANTS[name].keys
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


def build_pass(spec: Spec) -> Any:
    """The pass for a parsed spec (its constructor checks key combinations)."""
    return VARIANTS[spec.name].pass_class(spec)


def variants_markdown() -> str:
    """The README's table of variants, one row per variant."""
    rows = ["| spec | what it does |", "|---|---|"]
    for v in VARIANTS.values():
        usage = ", ".join(f"`{u}`" for u in v.usage).replace("|", "\\|")
        rows.append(f"| {usage} | {v.summary} |")
    return "\n".join(rows) + "\n"


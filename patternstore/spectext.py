"""Specs as text: the SPEC grammar of the command line and its config files.

    SPEC   = KIND ":" FIELD "=" VALUE { ":" FIELD "=" VALUE }
    VALUE  = ITEM { "," ITEM }           (a list; list-valued fields only)
    ITEM   = integer | "true" | "false" | string

    dilated:segment_lengths=2048,4096,8192:dilation_rates=1,2,4:num_heads=8
    bigbird:seq_len=1048576:block_size=128:num_heads=8:num_random_blocks=2:seed=7

KIND is ``dilated`` or a sparse kind (``SPARSE_KINDS``); FIELDs are the
keyword arguments of ``DilatedSpec`` / ``SparseSpec``, declared once as
``Field``s (``kind_schema``). Integers are decimal
(an optional sign, digits), ``true``/``false`` (any case) are bools, anything
else is a string. The fields in ``LIST_FIELDS`` always become tuples, even
with one item; a comma anywhere else leaves a string that the spec rejects.

Every function here raises ``SpecError`` (one line: what is wrong and what is
allowed) and never anything else for bad input, so a caller can validate a
whole batch of specs before it does any work.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any, Mapping, Sequence

from .fields import Field
from .kinds import SPARSE_KINDS
from .specs import DILATED_FIELDS, SPARSE_BASE_FIELDS, DilatedSpec, SparseSpec, Spec

KINDS = (DilatedSpec.kind, *SPARSE_KINDS)


class SpecError(ValueError):
    """A spec (as text or fields) that cannot be built; the message is one line."""


def kind_schema(kind: str) -> tuple[Field, ...]:
    """Every field of ``kind``, in the order ``--help`` lists them."""
    if kind == DilatedSpec.kind:
        return DILATED_FIELDS
    if kind in SPARSE_KINDS:
        return SPARSE_BASE_FIELDS + SPARSE_KINDS[kind].params
    raise SpecError(f"unknown kind {kind!r}; allowed kinds: {', '.join(KINDS)}")


LIST_FIELDS = frozenset(f.name for kind in KINDS for f in kind_schema(kind) if f.is_list)
# Listings keep these even at their default: they say what the pattern is for.
_ALWAYS_SHOWN = frozenset({"seq_len", "num_heads", "block_size"})
_INTEGER = re.compile(r"[+-]?[0-9]+")

EXAMPLES = (
    "dilated:segment_lengths=2048,4096,8192:dilation_rates=1,2,4:num_heads=8",
    "bigbird:seq_len=1048576:block_size=128:num_heads=8:num_random_blocks=2:seed=7",
)


def kind_fields(kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(allowed, required)`` field names of ``kind``."""
    schema = kind_schema(kind)
    return tuple(f.name for f in schema), tuple(f.name for f in schema if f.required)


def spec_from_fields(kind: str, fields: Mapping[str, Any]) -> Spec:
    """Build and validate the spec of ``kind`` from ``fields`` (values already
    typed: from the grammar or from TOML). List-valued fields become tuples
    (a lone scalar becomes a one-item tuple)."""
    allowed, required = kind_fields(kind)
    unknown = [name for name in fields if name not in allowed]
    if unknown:
        raise SpecError(
            f"unknown field {', '.join(map(repr, unknown))} for kind {kind!r}; allowed fields: {', '.join(allowed)}"
        )
    missing = [name for name in required if name not in fields]
    if missing:
        raise SpecError(
            f"kind {kind!r} needs field {', '.join(map(repr, missing))}; required: {', '.join(required)}; "
            f"optional: {', '.join(n for n in allowed if n not in required)}"
        )
    normalized = {}
    for name, value in fields.items():
        if name in LIST_FIELDS and not isinstance(value, (list, tuple)):
            value = (value,)
        normalized[name] = tuple(value) if isinstance(value, list) else value
    try:
        if kind == DilatedSpec.kind:
            return DilatedSpec(**normalized)
        return SparseSpec(kind, **normalized)
    except (TypeError, ValueError) as error:
        raise SpecError(str(error)) from None


def _value(name: str, text: str) -> int | bool | str:
    if _INTEGER.fullmatch(text):
        if len(text) > 40:  # past every field's range (2**63 has 19 digits); int() refuses 4300+
            raise SpecError(f"{name} has an integer of {len(text)} digits; every integer field is < 2**63")
        return int(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_spec(text: str) -> Spec:
    """The spec written as ``text`` in the SPEC grammar (module docstring)."""
    shown = repr(text) if len(text) <= 200 else f"{text[:100]!r}...({len(text)} characters)"
    kind, *pairs = text.split(":")
    if not kind or not pairs:
        raise SpecError(f"malformed SPEC {shown}: expected KIND:FIELD=VALUE:..., e.g. {EXAMPLES[0]}")
    if kind not in KINDS:  # say so before complaining about its fields
        raise SpecError(f"bad SPEC {shown}: unknown kind {kind!r}; allowed kinds: {', '.join(KINDS)}")
    fields: dict[str, Any] = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise SpecError(f"malformed SPEC {shown}: {pair!r} is not FIELD=VALUE")
        if name in fields:
            raise SpecError(f"malformed SPEC {shown}: field {name!r} given twice")
        if value == "":
            raise SpecError(f"malformed SPEC {shown}: field {name!r} has no value")
        items = value.split(",")
        if name in LIST_FIELDS and "" in items:
            raise SpecError(f"malformed SPEC {shown}: empty item in {name}={value!r}; items are separated by single commas")
        try:
            fields[name] = tuple(_value(name, item) for item in items) if name in LIST_FIELDS else _value(name, value)
        except SpecError as error:
            raise SpecError(f"bad SPEC {shown}: {error}") from None
    try:
        return spec_from_fields(kind, fields)
    except SpecError as error:
        raise SpecError(f"bad SPEC {shown}: {error}") from None


def format_value(value: Any) -> str:
    """One VALUE of the grammar: ``true``/``false``, comma-joined tuples; ``none``
    for an unset optional field (which ``format_spec`` leaves out instead)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(map(format_value, value))
    return str(value)


def format_spec(spec: Spec, *, defaults: bool = True) -> str:
    """``spec`` in the SPEC grammar; ``parse_spec`` of the result has the same
    key. ``defaults=False`` leaves out the fields that equal their default
    (shorter, for listings; ``seq_len``, ``num_heads`` and ``block_size`` stay)."""
    fields = spec.fields()
    if not defaults:
        fields = {name: value for name, value in fields.items() if not _is_default(spec, name, value)}
    return ":".join([spec.kind, *(f"{name}={format_value(value)}" for name, value in fields.items() if value is not None)])


def _is_default(spec: Spec, name: str, value: Any) -> bool:
    if name in _ALWAYS_SHOWN:
        return False
    field = next(f for f in kind_schema(spec.kind) if f.name == name)
    return not field.required and value == field.default


def grammar_help() -> str:
    """The SPEC grammar for the command line's --help: every kind with its help
    line and its fields (required, then optional with defaults), from their declarations."""
    def fields(schema: Sequence[Field]) -> str:
        required = [f.name for f in schema if f.required]
        def optional(f: Field) -> str:
            choices = getattr(f.check, "allowed", ())  # a choice lists its values, the default first
            allowed = (f.default, *(c for c in choices if c != f.default))
            return f.name if f.default is None else f"{f.name}={'|'.join(map(format_value, allowed))}"

        optional = [optional(f) for f in schema if not f.required]
        return " ".join(required + ([f"[{' '.join(optional)}]"] if optional else []))

    declared = [(kind, f.name, (f.check.minimum, f.check.maximum))
                for kind in KINDS for f in kind_schema(kind) if hasattr(f.check, "maximum")]
    shared = {name for name in {n for _, n, _ in declared}
              if len({bounds for _, n, bounds in declared if n == name}) > 1}
    ranges: dict[tuple[int, int], set[str]] = {}
    for kind, name, bounds in declared:  # a name with several ranges is shown with its kind
        ranges.setdefault(bounds, set()).add(f"{name} ({kind})" if name in shared else name)
    lines = [
        "SPEC grammar:  KIND:FIELD=VALUE:FIELD=VALUE...",
        "  VALUE  an integer, true/false, or a string. List fields take items separated by",
        *textwrap.wrap(f"commas (one item is a list of one): {', '.join(sorted(LIST_FIELDS))}", 80,
                       initial_indent="         ", subsequent_indent="         "),
        "  integer ranges (each list item too):",
        *(line for (low, high), names in sorted(ranges.items()) for line in textwrap.wrap(
            f"[{low}, {high}]: {', '.join(sorted(names))}", 80, initial_indent="    ", subsequent_indent="      ")),
        "  KINDs and their FIELDs (optional ones in brackets, with their defaults):",
        f"    dilated          {fields(kind_schema('dilated'))}  (one pattern for every length)",
        f"    every sparse kind: {fields(SPARSE_BASE_FIELDS)}, and",
    ]
    for name, kind in SPARSE_KINDS.items():
        lines += textwrap.wrap(f"{kind.help}: {fields(kind.params)}", 96,
                               initial_indent=f"      {name:<15}", subsequent_indent=" " * 21)
    return "\n".join(lines + ["examples:", *(f"  {example}" for example in EXAMPLES)])

"""Spec fields: one declaration per field (name, check, default, help), and
the one routine that validates a set of them.

Both spec classes (``DilatedSpec``, ``SparseSpec``) and every sparse kind
(``patternstore.kinds``) declare their fields as ``Field`` tuples; the spec
text grammar, the command line's help and the defaults of a listing read the
same declarations, so a field is described in exactly one place.

Guarantees: bad input raises before anything is built, ``TypeError`` for a
wrong type (a ``bool`` where an int is meant included) and ``ValueError`` for
a wrong value, each message naming the field and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "REQUIRED", "Field", "validate_fields", "check_int", "check_nonneg_int", "check_int_tuple",
    "check_nonneg_int_tuple", "check_optional_nonneg_int_tuple", "check_bool", "check_choice", "choice",
    "check_branches",
]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the default of a field the caller must give


@dataclass(frozen=True)
class Field:
    """One field of a spec: ``check(name, value)`` returns the normalized
    value or raises; ``default`` is used when the caller leaves it out
    (``REQUIRED``: it may not); ``is_list``: a list-valued field (spec text
    turns one item into a one-item tuple); ``help``: one line for ``--help``."""

    name: str
    check: Callable[[str, Any], Any]
    default: Any = REQUIRED
    help: str = ""
    is_list: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def validate_fields(owner: str, schema: Sequence[Field], values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` checked against ``schema`` (in schema order, defaults filled
    in). ``owner`` names what the fields belong to in messages, e.g.
    ``"kind 'bigbird'"``."""
    names = [f.name for f in schema]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for {owner}; valid parameters: {', '.join(sorted(names))}"
        )
    missing = [f.name for f in schema if f.required and f.name not in values]
    if missing:
        raise TypeError(f"{owner} needs {', '.join(missing)}")
    return {f.name: f.check(f.name, values[f.name]) if f.name in values else f.default for f in schema}


# ---------------------------------------------------------------- checks
def check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_nonneg_int(name: str, value: Any) -> int:
    return check_int(name, value, minimum=0)


def check_int_tuple(name: str, value: Any, minimum: int = 1) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of ints >= {minimum}, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} must not be empty")
    return tuple(check_int(f"{name}[{i}]", item, minimum) for i, item in enumerate(value))


def check_nonneg_int_tuple(name: str, value: Any) -> tuple[int, ...]:
    return check_int_tuple(name, value, minimum=0)


def check_optional_nonneg_int_tuple(name: str, value: Any) -> tuple[int, ...] | None:
    return None if value is None else check_int_tuple(name, value, minimum=0)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def choice(*allowed: str) -> Callable[[str, Any], str]:
    """The check of a field that takes one of ``allowed``."""
    def check(name: str, value: Any) -> str:
        return check_choice(name, value, allowed)

    check.allowed = allowed  # type: ignore[attr-defined]  # for help texts
    return check


def check_branches(
    segment_lengths: Any, dilation_rates: Any, unit: str = ""
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate LongNet branches (w_i, r_i): same count, r_i <= w_i."""
    segments = check_int_tuple("segment_lengths", segment_lengths)
    rates = check_int_tuple("dilation_rates", dilation_rates)
    if len(segments) != len(rates):
        raise ValueError(
            f"segment_lengths and dilation_rates must have the same length, "
            f"got {len(segments)} and {len(rates)}"
        )
    for i, (w, r) in enumerate(zip(segments, rates)):
        if r > w:
            raise ValueError(
                f"dilation_rates[{i}]={r} is larger than its segment "
                f"segment_lengths[{i}]={w}{unit}; a rate must be <= its segment length"
            )
    return segments, rates

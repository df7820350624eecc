"""Spec fields: one declaration per field (name, check, default, help), and
the one routine that validates a set of them.

Both spec classes (``DilatedSpec``, ``SparseSpec``) and every sparse kind
(``patternstore.kinds``) declare their fields as ``Field`` tuples; the spec
text grammar, the command line's help and the defaults of a listing read the
same declarations, so a field is described in exactly one place.

Guarantees: bad input raises before anything is built, ``TypeError`` for a
wrong type (a ``bool`` where an int is meant included) and ``ValueError`` for
a wrong value, each message naming the field and what is allowed. An int is
anything with ``__index__`` but a bool (``as_int``: numpy's integers are
taken), stored as a Python int.

Ranges: every int field of a spec has one, declared with its field
(``int_range``, ``int_tuple_range``) and checked at construction, so no
value reaches the key's msgpack (which holds 64 bits) or an array unchecked.
Counts, sizes and block indices lie in ``[minimum, INT32_MAX]``: the layouts
and group tables that hold them are int32. A ``seed`` lies in ``[0, 2**63 - 1]``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "REQUIRED", "INT32_MAX", "Field", "validate_fields", "as_int", "check_int", "check_int_tuple", "int_range",
    "int_tuple_range", "optional_int_tuple_range", "check_bool", "check_choice", "choice", "check_branches",
]

INT32_MAX = 2**31 - 1  # the largest count, size or block index: layouts and group tables are int32


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
def _allowed(minimum: int, maximum: int | None) -> str:
    return f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"


def _shown(value: int) -> str:
    # Python refuses to print ints of over 4300 digits; the size says enough.
    return str(value) if value.bit_length() <= 128 else f"an int of {value.bit_length()} bits"


def as_int(value: Any) -> int | None:
    """``value`` as a Python int when it is an integer: an ``int`` or anything
    with ``__index__`` (numpy's integer scalars, a one-element integer
    tensor); None for anything else, a bool (a flag, not a count) or a
    bool-typed scalar included. The one rule of what counts as an int."""
    if isinstance(value, bool) or "bool" in str(getattr(value, "dtype", "")):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_int(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    number = as_int(value)
    if number is None:
        raise TypeError(f"{name} must be an int {_allowed(minimum, maximum)}, got {type(value).__name__} {value!r}")
    if number < minimum or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be an int {_allowed(minimum, maximum)}, got {_shown(number)}")
    return number


def check_int_tuple(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of ints {_allowed(minimum, maximum)}, "
                        f"got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} must not be empty")
    return tuple(check_int(f"{name}[{i}]", item, minimum, maximum) for i, item in enumerate(value))


def int_range(minimum: int = 1, maximum: int = INT32_MAX) -> Callable[[str, Any], int]:
    """The check of an int field in ``[minimum, maximum]`` (both on the check, for help texts)."""
    def check(name: str, value: Any) -> int:
        return check_int(name, value, minimum, maximum)

    check.minimum, check.maximum = minimum, maximum  # type: ignore[attr-defined]
    return check


def int_tuple_range(minimum: int = 1, maximum: int = INT32_MAX) -> Callable[[str, Any], tuple[int, ...]]:
    """The check of a non-empty list field of ints in ``[minimum, maximum]``."""
    def check(name: str, value: Any) -> tuple[int, ...]:
        return check_int_tuple(name, value, minimum, maximum)

    check.minimum, check.maximum = minimum, maximum  # type: ignore[attr-defined]
    return check


def optional_int_tuple_range(minimum: int = 0, maximum: int = INT32_MAX) -> Callable[[str, Any], tuple[int, ...] | None]:
    """``int_tuple_range``, or None (the field is unset)."""
    inner = int_tuple_range(minimum, maximum)

    def check(name: str, value: Any) -> tuple[int, ...] | None:
        return None if value is None else inner(name, value)

    check.minimum, check.maximum = minimum, maximum  # type: ignore[attr-defined]
    return check


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
    segments = check_int_tuple("segment_lengths", segment_lengths, 1, INT32_MAX)
    rates = check_int_tuple("dilation_rates", dilation_rates, 1, INT32_MAX)
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

"""Pattern specs: frozen, validated descriptions of one attention pattern.

A spec names everything that decides a pattern's arrays and nothing else.
Every spec carries ``.key``, a content address computed once at construction
(docs/design.md section 3.1):

    key = f"{kind}-v{format_version}-{sha256(canonical msgpack)[:40]}"

where the canonical msgpack is ``[kind, format_version, sorted(fields)]``:
lists and tuples pack alike, ints as ints, floats as exact float64, and the
field order of the caller's keyword arguments cannot matter. No Python
``hash()`` and no ``repr`` enter a key, so it is the same in every process
whatever ``PYTHONHASHSEED`` is.

Both spec classes are built the same way: their fields are ``Field``
declarations (``patternstore.fields``; a sparse kind's own parameters are its
entry in ``patternstore.kinds.SPARSE_KINDS``), checked by one routine, then
the cross-field rules; the spec is immutable and equality and hashing go by
``key``. Bad input raises before anything is built: ``TypeError`` for a wrong
type (a ``bool`` where an int is meant included), ``ValueError`` for a wrong
value, each message naming the field and what is allowed.
"""

from __future__ import annotations

import hashlib
from types import MappingProxyType
from typing import Any, Mapping, Union

import msgpack

from .fields import (  # noqa: F401  (check_* are re-exported: the modules validate with them)
    INT32_MAX,
    Field,
    check_bool,
    check_branches,
    check_choice,
    check_int,
    check_int_tuple,
    choice,
    int_range,
    int_tuple_range,
    validate_fields,
)
from .kinds import SPARSE_KINDS

# Bump a version whenever the generator's output or the array layout of that
# kind changes: old entries then live under other keys and are never misread.
DILATED_FORMAT_VERSION = 2  # 2: length-free (no seq_len), groups [G, 6], no positions
SPARSE_FORMAT_VERSION = 2  # 2: random blocks per (seed, head, row); causal fixed windows length-free

SCHEMES = ("longnet", "grouped")


def canonical_key(kind: str, version: int, fields: Mapping[str, Any]) -> str:
    """Content address of ``fields`` (values: int, float, str, bool, None or
    tuples of those). Floats are hashed as their exact float64 bits."""
    payload = msgpack.packb(
        [kind, version, sorted(fields.items())], use_bin_type=True, use_single_float=False
    )
    return f"{kind}-v{version}-{hashlib.sha256(payload).hexdigest()[:40]}"


# ---------------------------------------------------------------- shared machinery
class _SpecBase:
    """What both spec classes share: immutability, ``fields()``, ``to_dict()``,
    equality and hashing by ``key``, pickling as the fields (specs cross
    process boundaries that way, and are re-validated on the other side)."""

    __slots__ = ()
    kind: str
    key: str

    def _freeze(self, version: int, values: Mapping[str, Any]) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "key", canonical_key(self.kind, version, self.fields()))

    def fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.fields()}

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __reduce__(self) -> tuple[Any, ...]:
        return (spec_from_dict, (self.to_dict(),))


# ---------------------------------------------------------------- dilated
DILATED_FIELDS: tuple[Field, ...] = (
    Field("segment_lengths", int_tuple_range(1), help="segment length w_i of each branch", is_list=True),
    Field("dilation_rates", int_tuple_range(1), help="dilation rate r_i <= w_i of each branch", is_list=True),
    Field("num_heads", int_range(1), help="attention heads"),
    Field("scheme", choice(*SCHEMES), "longnet",
          help="longnet: every branch on every head; grouped: branch i on head group i"),
)


class DilatedSpec(_SpecBase):
    """LongNet dilated attention over ``num_heads`` heads, at any sequence
    length: branch i has segment length ``segment_lengths[i]`` and dilation
    rate ``dilation_rates[i]``; ``scheme`` is "longnet" (every branch on every
    head, offsets by head group) or "grouped" (branch i on head group i only).
    The pattern does not depend on the length: what a length n makes of a
    branch (s = min(w, n), full segments, tail) is derived at call time
    (docs/design.md section 2.1)."""

    __slots__ = ("segment_lengths", "dilation_rates", "num_heads", "scheme", "key")
    kind = "dilated"
    FIELDS = DILATED_FIELDS
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    num_heads: int
    scheme: str

    def __init__(self, segment_lengths: Any, dilation_rates: Any, num_heads: int, scheme: str = "longnet") -> None:
        values = validate_fields(
            "kind 'dilated'", DILATED_FIELDS,
            {"segment_lengths": segment_lengths, "dilation_rates": dilation_rates,
             "num_heads": num_heads, "scheme": scheme},
        )
        check_branches(values["segment_lengths"], values["dilation_rates"])
        if values["scheme"] == "grouped" and len(values["segment_lengths"]) > values["num_heads"]:
            raise ValueError(
                f"scheme='grouped' gives each branch its own head group, so it needs num_heads >= number "
                f"of branches; got num_heads={values['num_heads']} and {len(values['segment_lengths'])} branches"
            )
        self._freeze(DILATED_FORMAT_VERSION, values)

    is_prefix_stable = True  # the pattern holds no length at all

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in DILATED_FIELDS}

    def __repr__(self) -> str:
        return f"DilatedSpec({', '.join(f'{k}={v!r}' for k, v in self.fields().items())})"


# ---------------------------------------------------------------- sparse
MAX_BLOCK_SIZE = 1 << 30  # the largest power of two <= INT32_MAX
SEED_MAX = 2**63 - 1  # a seed is hashed as an int64


def _check_block_size(name: str, value: Any) -> int:
    value = check_int(name, value, 1, MAX_BLOCK_SIZE)
    if value & (value - 1):
        raise ValueError(f"{name} must be a power of two (1, 2, 4, ..., 128, ..., 2**30), got {value}")
    return value


_check_block_size.minimum, _check_block_size.maximum = 1, MAX_BLOCK_SIZE  # type: ignore[attr-defined]


# The fields every sparse kind has, before its own parameters.
SPARSE_BASE_FIELDS: tuple[Field, ...] = (
    Field("seq_len", int_range(1), help="sequence length"),
    Field("block_size", _check_block_size, help="positions per block, a power of two"),
    Field("num_heads", int_range(1), 1, help="attention heads"),
    Field("seed", int_range(0, SEED_MAX), 0, help="seed of the random blocks"),
)


class SparseSpec(_SpecBase):
    """A block-sparse layout of ``kind`` over ``ceil(seq_len / block_size)``
    query and key blocks for ``num_heads`` heads. ``params`` are the kind's
    parameters (``SPARSE_KINDS[kind].params``: DeepSpeed's names), defaults
    filled in, so a spec that spells a default out equals one that leaves it
    implicit. Random blocks come from ``seed``.

    Immutable; equality and hashing go by ``key``."""

    __slots__ = ("kind", "seq_len", "block_size", "num_heads", "seed", "params", "key")
    kind: str
    seq_len: int
    block_size: int
    num_heads: int
    seed: int
    params: Mapping[str, Any]

    def __init__(
        self, kind: str, seq_len: int, block_size: int, num_heads: int = 1, seed: int = 0, **params: Any
    ) -> None:
        check_choice("kind", kind, tuple(SPARSE_KINDS))
        entry = SPARSE_KINDS[kind]
        base = validate_fields(
            f"kind {kind!r}", SPARSE_BASE_FIELDS,
            {"seq_len": seq_len, "block_size": block_size, "num_heads": num_heads, "seed": seed},
        )
        own = validate_fields(f"kind {kind!r}", entry.params, params)
        entry.check(own, -(-base["seq_len"] // base["block_size"]))
        object.__setattr__(self, "kind", kind)
        self._freeze(SPARSE_FORMAT_VERSION, {**base, "params": MappingProxyType(dict(sorted(own.items())))})

    @property
    def num_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    @property
    def is_prefix_stable(self) -> bool:
        """True when, under the causal rule (key block <= query block), the
        layout of any shorter length is the first rows of this one, and this
        one the first rows of any longer: causal decode may then use the rows
        of a longer (capacity) layout. Always True for
        ``attention="unidirectional"``; False where a bidirectional kind
        draws random blocks from the whole row."""
        return SPARSE_KINDS[self.kind].prefix_stable(self.params)

    @property
    def layout_heads(self) -> int:
        """Leading dimension of the layout: ``num_heads`` where heads differ, else 1."""
        return self.num_heads if SPARSE_KINDS[self.kind].per_head(self.params) else 1

    def fields(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "block_size": self.block_size,
            "num_heads": self.num_heads,
            "seed": self.seed,
            **self.params,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.fields().items())
        return f"SparseSpec(kind={self.kind!r}, {args})"


def sparse_template(kind: str, block_size: Any, seed: Any = 0, **params: Any) -> tuple[int, int, dict[str, Any]]:
    """``(block_size, seed, params)`` validated and normalized (defaults filled
    in) by every rule of ``SparseSpec`` that holds at every length, for a
    caller that takes the length and head count from each call (a module):
    its errors name only fields the caller passed. The length's own rule
    (``num_random_blocks`` <= the blocks of a row) is checked per length."""
    check_choice("kind", kind, tuple(SPARSE_KINDS))
    entry = SPARSE_KINDS[kind]
    template = [f for f in SPARSE_BASE_FIELDS if f.name in ("block_size", "seed")]
    base = validate_fields(f"kind {kind!r}", template, {"block_size": block_size, "seed": seed})
    own = validate_fields(f"kind {kind!r}", entry.params, params)
    entry.check(own, INT32_MAX)  # as many blocks as a layout holds: no length rule fails
    return base["block_size"], base["seed"], dict(sorted(own.items()))


Spec = Union[DilatedSpec, SparseSpec]


def spec_from_dict(data: Mapping[str, Any]) -> Spec:
    """Rebuild (and so re-validate) a spec from ``spec.to_dict()``."""
    fields = dict(data)
    kind = fields.pop("kind", None)
    if kind == DilatedSpec.kind:
        return DilatedSpec(**fields)
    if kind in SPARSE_KINDS:
        return SparseSpec(kind, **fields)
    raise ValueError(f"kind must be 'dilated' or one of {', '.join(map(repr, SPARSE_KINDS))}; got {kind!r}")

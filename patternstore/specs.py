"""Pattern specs: frozen, validated descriptions of one attention pattern.

A spec names everything that decides a pattern's arrays and nothing else.
Every spec carries ``.key``, a content address computed once at construction
(DESIGN.md section 3):

    key = f"{kind}-v{format_version}-{sha256(canonical msgpack)[:40]}"

where the canonical msgpack is ``[kind, format_version, sorted(fields)]``:
lists and tuples pack alike, ints as ints, floats as exact float64, and the
field order of the caller's keyword arguments cannot matter. No Python
``hash()`` and no ``repr`` enter a key, so it is the same in every process
whatever ``PYTHONHASHSEED`` is.

Bad input raises before anything is built: ``TypeError`` for a wrong type
(a ``bool`` where an int is meant included), ``ValueError`` for a wrong value,
each message naming the field and what is allowed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Union

import msgpack

# Bump a version whenever the generator's output or the array layout of that
# kind changes: old entries then live under other keys and are never misread.
DILATED_FORMAT_VERSION = 2  # 2: length-free (no seq_len), groups [G, 6], no positions
SPARSE_FORMAT_VERSION = 1

SCHEMES = ("longnet", "grouped")
DIRECTIONS = ("bidirectional", "unidirectional")


def canonical_key(kind: str, version: int, fields: Mapping[str, Any]) -> str:
    """Content address of ``fields`` (values: int, float, str, bool, None or
    tuples of those). Floats are hashed as their exact float64 bits."""
    payload = msgpack.packb(
        [kind, version, sorted(fields.items())], use_bin_type=True, use_single_float=False
    )
    return f"{kind}-v{version}-{hashlib.sha256(payload).hexdigest()[:40]}"


# ---------------------------------------------------------------- validators
def check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_int_tuple(name: str, value: Any, minimum: int = 1) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of ints >= {minimum}, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} must not be empty")
    return tuple(check_int(f"{name}[{i}]", item, minimum) for i, item in enumerate(value))


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


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


# ---------------------------------------------------------------- dilated
@dataclass(frozen=True)
class DilatedSpec:
    """LongNet dilated attention over ``num_heads`` heads, at any sequence
    length: branch i has segment length ``segment_lengths[i]`` and dilation
    rate ``dilation_rates[i]``; ``scheme`` is "longnet" (every branch on every
    head, offsets by head group) or "grouped" (branch i on head group i only).
    The pattern does not depend on the length: what a length n makes of a
    branch (s = min(w, n), full segments, tail) is derived at call time
    (docs/design.md, dilated attention)."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    num_heads: int
    scheme: str = "longnet"
    key: str = field(init=False, repr=False, compare=False)

    kind = "dilated"

    def __post_init__(self) -> None:
        segments, rates = check_branches(self.segment_lengths, self.dilation_rates)
        num_heads = check_int("num_heads", self.num_heads)
        scheme = check_choice("scheme", self.scheme, SCHEMES)
        if scheme == "grouped" and len(segments) > num_heads:
            raise ValueError(
                f"scheme='grouped' gives each branch its own head group, so it needs "
                f"num_heads >= number of branches; got num_heads={num_heads} and {len(segments)} branches"
            )
        object.__setattr__(self, "segment_lengths", segments)
        object.__setattr__(self, "dilation_rates", rates)
        object.__setattr__(self, "num_heads", num_heads)
        object.__setattr__(self, "key", canonical_key(self.kind, DILATED_FORMAT_VERSION, self.fields()))

    def fields(self) -> dict[str, Any]:
        return {
            "segment_lengths": self.segment_lengths,
            "dilation_rates": self.dilation_rates,
            "num_heads": self.num_heads,
            "scheme": self.scheme,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.fields()}


# ---------------------------------------------------------------- sparse
def _int_or_none_tuple(name: str, value: Any) -> tuple[int, ...] | None:
    return None if value is None else check_int_tuple(name, value, minimum=0)


def _nonneg_int(name: str, value: Any) -> int:
    return check_int(name, value, minimum=0)


def _direction(name: str, value: Any) -> str:
    return check_choice(name, value, DIRECTIONS)


_Param = tuple[Any, Callable[[str, Any], Any]]  # (default, validator(name, value) -> normalized)

# DeepSpeed's sparsity-config names and defaults where DeepSpeed has the kind.
SPARSE_KINDS: dict[str, dict[str, _Param]] = {
    "dense": {"attention": ("bidirectional", _direction)},
    "fixed": {
        "num_local_blocks": (4, check_int),
        "num_global_blocks": (1, check_int),
        "attention": ("bidirectional", _direction),
        "horizontal_global_attention": (False, check_bool),
        "num_different_global_patterns": (1, check_int),
        "different_layout_per_head": (False, check_bool),
    },
    "bigbird": {
        "num_random_blocks": (1, _nonneg_int),
        "num_sliding_window_blocks": (3, check_int),
        "num_global_blocks": (1, _nonneg_int),
        "attention": ("bidirectional", _direction),
        "different_layout_per_head": (False, check_bool),
    },
    "bslongformer": {
        "num_sliding_window_blocks": (3, check_int),
        "global_block_indices": ((0,), lambda n, v: check_int_tuple(n, v, minimum=0)),
        "global_block_end_indices": (None, _int_or_none_tuple),
        "attention": ("bidirectional", _direction),
    },
    "variable": {
        "num_random_blocks": (0, _nonneg_int),
        "local_window_blocks": ((4,), check_int_tuple),
        "global_block_indices": ((0,), lambda n, v: check_int_tuple(n, v, minimum=0)),
        "global_block_end_indices": (None, _int_or_none_tuple),
        "attention": ("bidirectional", _direction),
        "horizontal_global_attention": (False, check_bool),
        "different_layout_per_head": (False, check_bool),
    },
    "local": {
        "num_sliding_window_blocks": (3, check_int),
        "attention": ("unidirectional", _direction),
    },
    "dilated_blocks": {
        "segment_lengths": ((4,), check_int_tuple),
        "dilation_rates": ((1,), check_int_tuple),
        "attention": ("bidirectional", _direction),
    },
}


class SparseSpec:
    """A block-sparse layout of ``kind`` over ``ceil(seq_len / block_size)``
    query and key blocks for ``num_heads`` heads. ``params`` are the kind's
    parameters (``SPARSE_KINDS[kind]``: DeepSpeed's names), defaults filled in,
    so a spec that spells a default out equals one that leaves it implicit.
    Random blocks come from ``seed`` through a ``torch.Generator``.

    Immutable; equality and hashing go by ``key``."""

    __slots__ = ("kind", "seq_len", "block_size", "num_heads", "seed", "params", "key")
    kind: str
    seq_len: int
    block_size: int
    num_heads: int
    seed: int
    params: Mapping[str, Any]
    key: str

    def __init__(
        self, kind: str, seq_len: int, block_size: int, num_heads: int = 1, seed: int = 0, **params: Any
    ) -> None:
        check_choice("kind", kind, tuple(SPARSE_KINDS))
        seq_len = check_int("seq_len", seq_len)
        block_size = check_int("block_size", block_size)
        if block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two (1, 2, 4, ..., 128, ...), got {block_size}")
        num_heads = check_int("num_heads", num_heads)
        seed = check_int("seed", seed, minimum=0)
        if seed >= 2**63:
            raise ValueError(f"seed must be < 2**63, got {seed}")
        schema = SPARSE_KINDS[kind]
        unknown = sorted(set(params) - set(schema))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(unknown)} for kind {kind!r}; "
                f"valid parameters: {', '.join(sorted(schema))}"
            )
        normalized = {
            name: validate(name, params[name]) if name in params else default
            for name, (default, validate) in schema.items()
        }
        _check_sparse_params(kind, -(-seq_len // block_size), normalized)
        for name, value in (("kind", kind), ("seq_len", seq_len), ("block_size", block_size),
                            ("num_heads", num_heads), ("seed", seed),
                            ("params", MappingProxyType(dict(sorted(normalized.items()))))):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "key", canonical_key(kind, SPARSE_FORMAT_VERSION, self.fields()))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"SparseSpec is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"SparseSpec is immutable; cannot delete {name!r}")

    @property
    def num_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    @property
    def layout_heads(self) -> int:
        """Leading dimension of the layout: ``num_heads`` where heads differ, else 1."""
        if self.kind == "dilated_blocks" or self.params.get("different_layout_per_head", False):
            return self.num_heads
        return 1

    def fields(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "block_size": self.block_size,
            "num_heads": self.num_heads,
            "seed": self.seed,
            **self.params,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.fields()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SparseSpec) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.fields().items())
        return f"SparseSpec(kind={self.kind!r}, {args})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Specs cross process boundaries (multiprocessing) as their fields.
        return (spec_from_dict, (self.to_dict(),))


def _check_sparse_params(kind: str, num_blocks: int, p: dict[str, Any]) -> None:
    """Cross-field rules of the sparse kinds (DeepSpeed's, plus range checks)."""
    if p.get("horizontal_global_attention") and p["attention"] != "bidirectional":
        raise ValueError("horizontal_global_attention=True needs attention='bidirectional'")
    if kind == "fixed":
        local, glob = p["num_local_blocks"], p["num_global_blocks"]
        if local % glob:
            raise ValueError(
                f"num_local_blocks ({local}) must be a multiple of num_global_blocks ({glob})"
            )
        patterns = p["num_different_global_patterns"]
        if patterns > local // glob:
            raise ValueError(
                f"num_different_global_patterns must be <= num_local_blocks // num_global_blocks "
                f"= {local // glob}, got {patterns}"
            )
        if patterns > 1 and not p["different_layout_per_head"]:
            raise ValueError("num_different_global_patterns > 1 needs different_layout_per_head=True")
    if "global_block_indices" in p:
        starts, ends = p["global_block_indices"], p["global_block_end_indices"]
        if max(starts) >= num_blocks:
            raise ValueError(
                f"global_block_indices must be < the number of blocks ({num_blocks}), got {list(starts)}"
            )
        if ends is not None:
            if len(ends) != len(starts):
                raise ValueError(
                    f"global_block_end_indices must have one entry per global_block_indices entry "
                    f"({len(starts)}), got {len(ends)}"
                )
            for i, (start, end) in enumerate(zip(starts, ends)):
                if not start < end <= num_blocks:
                    raise ValueError(
                        f"global_block_end_indices[{i}]={end} must be > global_block_indices[{i}]={start} "
                        f"and <= the number of blocks ({num_blocks})"
                    )
    if kind == "dilated_blocks":
        check_branches(p["segment_lengths"], p["dilation_rates"], unit=" blocks")


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

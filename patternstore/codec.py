"""The stored value, format 2: a small header, then the raw arrays, aligned
(docs/design.md section 3.2).

    offset  size  field
    0       4     magic        b"PSV\\x00"
    4       8     checksum     xxh3_64, little-endian, of every byte from offset 12 to the end
    12      4     format       ENVELOPE_VERSION (uint32 little-endian)
    16      4     header_size  bytes of the msgpack header (uint32 little-endian)
    20      h     header       msgpack map {"key": str, "spec": map,
                                 "arrays": [[name, dtype, shape, offset], ...]}
    ...           zero padding to ``data_start = align(20 + h)``
    data_start    payload      the arrays back to back in the header's order, array i
                               at ``data_start + offset_i``, each offset a multiple of
                               ``PACK_ALIGN``, each array zero-padded to one

The payload is exactly ``PackedPattern``'s buffer layout, so a disk hit reads
the whole value once into one fresh aligned buffer and the memory tier keeps
the payload's slice of it as its ``PackedPattern`` (``decode_packed``); the
arrays are views of that buffer, never copied again. ``dtype`` is a numpy-style
name (``"<i4"``), ``offset`` is relative to ``data_start``.

Checksum: xxh3_64 (the ``xxhash`` package). Measured on a 1.8 MB value (the
bigbird layout at 1M tokens), one core of this machine: zlib.crc32 750 us
(2.4 GB/s), google-crc32c 90 us (20 GB/s, SSE4.2), xxh3_64 66 us (28 GB/s),
xxh64 221 us. xxh3_64 is the fastest, and a 64-bit hash lets a random
corruption through with probability 2**-64, against 2**-32 for a CRC-32. It
guards against torn writes and bit rot, which is all a checksum can do: it is
not keyed, so it adds nothing against someone who can write the directory
(the key check and never unpickling do).

Guarantees kept here:
- ``encode`` and ``encode_packed`` are pure functions of the pattern: equal
  patterns give equal bytes. ``encode_packed`` copies each array once, into
  the buffer the memory tier then holds and the disk tier writes from (a
  miss costs one copy, as a disk hit does).
- ``decode`` never executes anything it reads: msgpack only builds maps,
  lists, strings, ints and bytes (no ext types are accepted); arrays are never
  parsed, only viewed where the header says they are, after every check.
- ``decode`` returns a pattern only when the magic and format are this
  format's, the length is exactly what the header describes, the checksum
  matches, the spec re-validates, its key equals the key the value was stored
  under, and the array table is exactly the canonical layout of known dtypes
  and non-negative shapes. Anything else raises ``CorruptValue``: the store
  treats it as a miss. A format-1 value (a msgpack map) fails the magic check
  (``OutdatedValue``, counted apart). What a valid checksum cannot tell apart
  from a true pattern (other payload bytes, a shape change that keeps the
  layout) only a writer of the directory can make; ``patternstore verify``
  compares entries with fresh generations.
- Every tensor made here is a real CPU tensor with normal version counting,
  whatever mode the caller is in (``real_tensors``).
"""

from __future__ import annotations

import ctypes
import math
import os
import struct
from typing import Any

import msgpack
import torch
import xxhash

from .pattern import PACK_ALIGN, PackedPattern, Pattern, real_tensors
from .specs import Spec, spec_from_dict

ENVELOPE_VERSION = 2
MAGIC = b"PSV\x00"
_PREFIX = struct.Struct("<4sQII")  # magic, checksum, format, header_size
_CHECKED_FROM = 12  # the checksum covers format, header_size, header, padding and payload
_FORMAT_1_FIRST_BYTE = 0x85  # format 1 was a msgpack map of 5 entries
_DTYPES = {"<i4": torch.int32}
_NAMES = {torch.int32: "<i4"}


class CorruptValue(ValueError):
    """A stored value that must not be used (its reason is the message)."""


class OutdatedValue(CorruptValue):
    """A value written in another format (a format-1 msgpack map, or another
    format number): a clean miss, counted apart from corruption."""


def _align(size: int) -> int:
    return -(-size // PACK_ALIGN) * PACK_ALIGN


def _view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy).
    Valid while ``tensor`` lives: the caller keeps it."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B")


def encode_packed(pattern: Pattern) -> tuple[PackedPattern, memoryview]:
    """``pattern`` as its format-2 value, built in one fresh aligned buffer
    into which every array is copied once: ``(packed, value)``, where
    ``packed`` views the payload (what the memory tier holds, as a disk hit's
    ``decode_packed`` gives it) and ``value`` the whole value (what the disk
    tier writes). ``value`` is valid while ``packed`` lives. The arrays must
    be int32; any device."""
    shapes = {}
    for name, tensor in pattern.arrays.items():
        if tensor.dtype not in _NAMES:
            raise TypeError(f"array {name!r} must be int32 to be stored, got {tensor.dtype}")
        shapes[name] = (tensor.dtype, tuple(tensor.shape))
    slots, payload_size = PackedPattern.layout(shapes)
    table = [[name, _NAMES[dtype], list(shape), offset] for name, dtype, shape, offset, _ in slots]
    header = msgpack.packb({"key": pattern.key, "spec": pattern.spec.to_dict(), "arrays": table}, use_bin_type=True)
    data_start = _align(_PREFIX.size + len(header))
    with real_tensors():
        buffer = torch.empty(data_start + payload_size, dtype=torch.uint8)
        value = _view(buffer)
        value[_PREFIX.size : _PREFIX.size + len(header)] = header
        value[_PREFIX.size + len(header) : data_start] = bytes(data_start - _PREFIX.size - len(header))
        for (_, _, _, offset, size), tensor in zip(slots, pattern.arrays.values()):
            start, end = data_start + offset, data_start + _align(size) + offset
            if size:
                source = tensor.detach().to("cpu").contiguous()
                ctypes.memmove(buffer.data_ptr() + start, source.data_ptr(), size)
            value[start + size : end] = bytes(end - start - size)  # the padding is part of the checksum
        struct.pack_into("<II", value, _CHECKED_FROM, ENVELOPE_VERSION, len(header))
        struct.pack_into("<4sQ", value, 0, MAGIC, xxhash.xxh3_64_intdigest(value[_CHECKED_FROM:]))
        return PackedPattern.over(pattern.spec, buffer[data_start:], shapes), value


def encode(pattern: Pattern) -> bytes:
    """Format-2 bytes of ``pattern`` (``encode_packed``'s value, copied out)."""
    packed, value = encode_packed(pattern)  # packed holds the memory value views
    return bytes(value)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of the format")


def unpack_plain(data: Any) -> Any:
    """msgpack -> plain maps (str keys), lists, strings, numbers and bytes;
    extension types are refused. Any malformed input raises ``ValueError``."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except Exception as error:  # msgpack raises several unrelated types on bad input
        raise ValueError(str(error)) from None


def read_value(source: Any) -> torch.Tensor:
    """A stored value as one fresh uint8 CPU tensor. ``source`` is bytes (one
    copy) or an open unbuffered file, read once straight into the tensor."""
    with real_tensors():
        if isinstance(source, (bytes, bytearray, memoryview)):
            value = torch.empty(len(source), dtype=torch.uint8)
            if len(source):
                _view(value)[:] = source
            return value
        if not hasattr(source, "readinto"):
            raise CorruptValue(f"value is {type(source).__name__}, not bytes")
        size = os.fstat(source.fileno()).st_size
        value = torch.empty(size, dtype=torch.uint8)
        view, done = _view(value), 0
        while done < size:
            got = source.readinto(view[done:])
            if not got:
                raise CorruptValue(f"value file ended after {done} of {size} bytes")
            done += got
        return value


def decode(value: Any, key: str) -> Pattern:
    """The pattern in ``value`` (bytes or an open file, stored under ``key``),
    or ``CorruptValue``."""
    return decode_packed(value, key).unpack()


def decode_packed(source: Any, key: str) -> PackedPattern:
    """``decode``, as the ``PackedPattern`` the memory tier holds: its buffer
    is the payload slice of the one tensor ``source`` was read into."""
    value = read_value(source)
    view = _view(value)
    if len(view) < _PREFIX.size:
        raise CorruptValue(f"not a format-{ENVELOPE_VERSION} value ({len(view)} bytes, "
                           f"shorter than the {_PREFIX.size}-byte prefix)")
    magic, checksum, version, header_size = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        if view[0] == _FORMAT_1_FIRST_BYTE:
            raise OutdatedValue(f"a format-1 value (a msgpack map), expected format {ENVELOPE_VERSION}")
        raise CorruptValue(f"not a format-{ENVELOPE_VERSION} value (magic {bytes(magic)!r})")
    if version != ENVELOPE_VERSION:
        raise OutdatedValue(f"value format {version}, expected {ENVELOPE_VERSION}")
    data_start = _align(_PREFIX.size + header_size)
    if data_start > len(view):
        raise CorruptValue(f"header of {header_size} bytes does not fit a value of {len(view)} bytes")
    if xxhash.xxh3_64_intdigest(view[_CHECKED_FROM:]) != checksum:
        raise CorruptValue("checksum mismatch")
    try:
        header = unpack_plain(view[_PREFIX.size : _PREFIX.size + header_size])
    except ValueError as error:
        raise CorruptValue(f"header is not msgpack: {error}") from None
    if not isinstance(header, dict) or set(header) != {"key", "spec", "arrays"}:
        raise CorruptValue("header is not a map of key, spec, arrays")
    if header["key"] != key:
        raise CorruptValue(f"value holds key {header['key']!r}, stored under {key!r}")
    spec_fields, table = header["spec"], header["arrays"]
    if not isinstance(spec_fields, dict) or not isinstance(table, list):
        raise CorruptValue("spec must be a map and arrays a list")
    try:
        spec = spec_from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in spec_fields.items()})
    except (TypeError, ValueError) as error:
        raise CorruptValue(f"stored spec is invalid: {error}") from None
    if spec.key != key:
        raise CorruptValue(f"stored spec has key {spec.key!r}, stored under {key!r}")
    arrays, payload_size = _array_table(table)
    if data_start + payload_size != len(view):
        raise CorruptValue(f"value has {len(view)} bytes, its header describes {data_start + payload_size}")
    with real_tensors():
        return PackedPattern.over(spec, value[data_start:], arrays)


def stored_spec(value: Any, key: str) -> Spec | None:
    """The spec a (possibly damaged) value was written for, read from its
    header without the checksum, when it rebuilds to exactly ``key``;
    regenerating that spec gives the one value that belongs under the key
    (``patternstore verify --repair``). None when the header is unreadable."""
    try:
        view = memoryview(value).cast("B")
        magic, _, _, header_size = _PREFIX.unpack_from(view)
        header = unpack_plain(view[_PREFIX.size : _PREFIX.size + header_size]) if magic == MAGIC else None
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in header["spec"].items()}
        spec = spec_from_dict(fields)
    except Exception:  # anything unreadable (any type, any shape): nothing to regenerate from
        return None
    return spec if spec.key == key else None


def stored_key(value: Any) -> str | None:
    """The key a value's header names, read without any check, or None when
    there is none; ``decode`` under that key then checks everything (a value
    file found without its database row: ``patternstore.rebuild``)."""
    try:
        view = memoryview(value).cast("B")
        magic, _, _, header_size = _PREFIX.unpack_from(view)
        header = unpack_plain(view[_PREFIX.size : _PREFIX.size + header_size]) if magic == MAGIC else None
        key = header["key"]
    except Exception:  # anything unreadable (any type, any shape): no key
        return None
    return key if isinstance(key, str) else None


def _array_table(table: list) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], int]:
    """(name -> (dtype, shape), payload bytes) of a header's array table, which
    must be exactly the canonical layout: names unique, offsets back to back,
    each aligned."""
    arrays, expected = {}, 0
    for entry in table:
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)):
            raise CorruptValue(f"array entry {entry!r} is not [name, dtype, shape, offset]")
        name, dtype, shape, offset = entry
        if name in arrays:
            raise CorruptValue(f"array {name!r} appears twice")
        if dtype not in _DTYPES:
            raise CorruptValue(f"array {name!r} has dtype {dtype!r}; allowed: {', '.join(_DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CorruptValue(f"array {name!r} has a malformed shape {shape!r}")
        if offset != expected or type(offset) is not int:
            raise CorruptValue(f"array {name!r} at offset {offset!r}, expected {expected}")
        arrays[name] = (_DTYPES[dtype], tuple(shape))
        expected += _align(math.prod(shape) * _DTYPES[dtype].itemsize)
    return arrays, expected

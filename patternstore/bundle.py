"""Portable bundles: many stored patterns in one file, to seed other machines.

    bundle = msgpack map {
        "format":  "patternstore-bundle",
        "version": BUNDLE_VERSION,
        "entries": [[key, value bytes], ...],   # values exactly as stored (codec.py, format 2)
    }

A bundle comes from outside: it is untrusted input. Its checksums are
unkeyed (xxh3), so anyone can edit an entry and reseal it; only
regenerating the entry from its spec tells a true pattern from another one.

Guarantees kept here:
- No pickle anywhere: reading builds maps, lists, strings and bytes only
  (msgpack extension types are refused), then every envelope goes through
  ``codec.decode``, which checks its checksum, version and key.
- Unless ``trust=True``, every entry is then regenerated from its spec and
  compared byte for byte with what the bundle holds (``encode`` is pure:
  the true pattern has exactly one value).
- ``read_bundle`` returns only when *every* entry passes; otherwise it raises
  ``BundleError`` naming the first bad entry, so an importer that writes after
  reading is all-or-nothing.
- Bounded regeneration: every entry is decoded and the cost of regenerating
  it checked from its spec (``patternstore.cost``: the generation limit,
  ``max_bytes`` or ``$PATTERNSTORE_MAX_GENERATION_BYTES``) before any entry
  is regenerated, so a small entry that asks for a huge layout is refused at
  once, and a bundle refused for its last entry costs no regeneration.
- Text from the bundle (keys, values it quotes) is shown escaped and cut
  (``patternstore.printable``) in every message: no terminal escape
  sequence and no 200,000-character key reaches the terminal.
- ``trust=True`` skips the regeneration only: the bundle's format, every
  checksum and every key are still checked. It trusts whoever wrote the
  bundle and the way it came to be that each entry's arrays are what
  ``generate`` makes of its spec (a bundle you exported yourself, moved
  over a channel you control).
- ``write_bundle`` writes a temporary file beside ``path`` and renames it
  over ``path``: a reader never sees half a bundle.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

import msgpack

from .codec import CorruptValue, decode, encode, unpack_plain
from .cost import SpecTooLarge, check_generation
from .generate import generate
from .printable import printable
from .specs import Spec

BUNDLE_FORMAT = "patternstore-bundle"
BUNDLE_VERSION = 1


class BundleError(ValueError):
    """A file that is not a complete, valid bundle (one-line message)."""


def write_bundle(path: Path, entries: Iterable[tuple[str, bytes]]) -> int:
    """Write ``entries`` (key, envelope bytes) to ``path``; returns the file size."""
    path = Path(path)
    body = msgpack.packb(
        {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "entries": [[k, v] for k, v in entries]},
        use_bin_type=True,
    )
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(body)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return len(body)


def read_bundle(path: Path, *, trust: bool = False, max_bytes: int | None = None) -> list[tuple[str, bytes]]:
    """The (key, envelope bytes) entries of the bundle at ``path``, every one
    decoded and (unless ``trust``) regenerated from its spec and compared
    byte for byte; ``BundleError`` (or ``OSError``) otherwise. ``max_bytes``:
    the generation limit (None: ``patternstore.cost.max_generation_bytes()``),
    checked for every entry before the first is regenerated."""
    data = Path(path).read_bytes()
    try:
        bundle = unpack_plain(data)
    except ValueError as error:
        raise BundleError(f"not a patternstore bundle (not msgpack: {printable(str(error))})") from None
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"not a patternstore bundle (no {BUNDLE_FORMAT!r} marker)")
    if bundle.get("version") != BUNDLE_VERSION:
        raise BundleError(f"bundle version {printable(repr(bundle.get('version')), 40)}; "
                          f"this patternstore reads version {BUNDLE_VERSION}")
    entries = bundle.get("entries")
    if not isinstance(entries, list):
        raise BundleError("bundle has no list of entries")
    checked: list[tuple[str, bytes, Spec]] = []
    for position, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], bytes)):
            raise BundleError(f"entry {position} is not a [key, envelope bytes] pair")
        key, value = entry
        shown = f"entry {position} ({printable(key, 80)})"
        try:
            spec = decode(value, key).spec
        except CorruptValue as error:
            raise BundleError(f"{shown} fails verification: {printable(str(error))}") from None
        if not trust:
            try:
                check_generation(spec, max_bytes)
            except SpecTooLarge as error:
                raise BundleError(f"{shown} is not regenerated: {error}; only trust=True (--trust) imports it "
                                  "unchecked") from None
        checked.append((key, value, spec))
    for position, (key, value, spec) in enumerate(checked if not trust else ()):
        if encode(generate(spec, max_bytes=max_bytes)) != value:
            raise BundleError(f"entry {position} ({printable(key, 80)}) differs from a fresh generation of its spec "
                              "(edited, or made by another generator); only trust=True (--trust) imports it")
    return [(key, value) for key, value, _ in checked]

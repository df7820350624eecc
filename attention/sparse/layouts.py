"""Where block-sparse modules get their layouts: the layout source of one
module description, its per-process caches, and the trace-time constant
that a compiled graph holds instead of a lookup.

``describe_layouts`` names a module's layouts completely (kind, block size,
seed, params, capacity, store directory) as one string, so any process
rebuilds the lookup from it (``source(description)``). ``LayoutSource.plan``
returns a ``LayoutPlan``: the CSR arrays for (kv_len, heads, device, causal)
and the row groups of the tiles from a first query block
(``sparse_tiles.row_groups``), looked up once and kept (the last
MAX_LAYOUTS used): a steady-state call is a dict lookup, with no store lock,
no device copy and no device-to-host sync.

Compile contract (docs/design.md section 4): ``baked_plan`` and
``baked_block_mask`` are ``torch.compiler.assume_constant_result``: dynamo
calls them once while tracing (the store lookup runs then, outside the
graph) and the graph holds their tensors as constants, so the compiled
region has no lock, no store I/O and no module construction. That needs the
length as an int; a symbolic length (``dynamic=True``, ``torch.export`` with
a ``Dim``) has no trace-time value, so those graphs look the layout up at run
time through the operator ``attention::sparse_layout`` (a cache hit after the
first call at a length; see attention/sparse/ops.py).

Capacity (docs/design.md section 7): in causal use of a prefix-stable
layout the store entry fetched is that of a capacity, ``max_seq_len`` or the
next power of two of the block count, and its first rows are used; store
entries then grow with log(max length), not with the number of lengths.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from patternstore.csr import drop_future_blocks, prefix_rows
from patternstore.pattern import real_tensors
from patternstore.kinds import SPARSE_KINDS
from patternstore.specs import SparseSpec
from patternstore.store import PatternStore, store_for

from attention.caches import BoundedCache, process_cache
from attention.block_mask import BLOCK_MASK_FIELDS, block_mask_from_csr
from attention.sparse.tiles import Groups, row_groups

__all__ = ["LayoutPlan", "LayoutSource", "describe_layouts", "source", "baked_plan", "unflatten_plan",
           "baked_block_mask", "SOURCES", "MAX_SOURCES"]


class LayoutPlan(NamedTuple):
    """A layout and its tiles' row groups (``sparse_tiles.row_groups``)."""

    kv_num_blocks: Tensor   # int32 [H, nb]
    kv_indices: Tensor      # int32 [nnz]
    groups: Groups


def describe_layouts(kind: str, block_size: int, seed: int, params: dict[str, Any],
                     store: Optional[PatternStore], max_seq_len: Optional[int]) -> str:
    """The self-describing string that names a module's layouts in any
    process: canonical JSON of the spec template (everything but the length
    and the head count), the capacity, and the store's directory ("" for the
    default store)."""
    if store is None:
        where = ""
    elif store.directory is not None:
        where = str(store.directory)
    else:  # a memory-only store exists in this process only
        where = f"memory:{id(store):x}"
    return json.dumps({"kind": kind, "block_size": block_size, "seed": seed, "params": params,
                       "max_seq_len": max_seq_len, "store": where}, sort_keys=True, separators=(",", ":"))


class LayoutSource:
    """The layouts of one description (``describe_layouts``)."""

    MAX_LAYOUTS = 32
    # BlockMasks (flex path) kept: each holds 4 arrays of H * nb * nb int32
    # (16 MiB each for one head at 256K tokens, block 128).
    MAX_BLOCK_MASKS = 8

    def __init__(self, description: str, store: Optional[PatternStore] = None) -> None:
        fields = json.loads(description)
        self.kind, self.block_size, self.seed = fields["kind"], fields["block_size"], fields["seed"]
        self.params, self.max_seq_len = fields["params"], fields["max_seq_len"]
        self._directory = fields["store"]
        self._store = store
        self._layouts: BoundedCache[tuple[Tensor, Tensor]] = BoundedCache(self.MAX_LAYOUTS)
        self._plans: BoundedCache[LayoutPlan] = BoundedCache(self.MAX_LAYOUTS)
        self._block_masks: BoundedCache[Any] = BoundedCache(self.MAX_BLOCK_MASKS)
        kind = SPARSE_KINDS[self.kind]  # what follows holds at every length
        self.per_head = kind.per_head(self.params)
        self.prefix_stable = kind.prefix_stable(self.params)
        self.unidirectional = self.params["attention"] == "unidirectional"
        # The fewest blocks (a power of two) at which the spec is valid
        # (num_random_blocks above a short length's block count): a causal
        # row draws from [0, row], so a short length is served by the first
        # rows of a capacity layout that is valid.
        self.min_capacity_blocks = next(1 << e for e in range(21) if self._valid(self.block_size << e))

    @property
    def store(self) -> PatternStore:
        if self._store is None:
            if self._directory.startswith("memory:"):
                raise RuntimeError("this module was built with a memory-only PatternStore, which exists in the "
                                   "process that made it only; give it a store with a directory")
            return store_for(self._directory or None)
        return self._store

    def spec(self, seq_len: int, num_heads: int) -> SparseSpec:
        return SparseSpec(self.kind, seq_len=seq_len, block_size=self.block_size,
                          num_heads=num_heads, seed=self.seed, **self.params)

    def _valid(self, seq_len: int) -> bool:
        try:
            self.spec(seq_len, 1)
        except ValueError:
            return False
        return True

    def capacity(self, seq_len: int) -> int:
        """The length whose layout serves ``seq_len`` in causal use."""
        if self.max_seq_len is not None and seq_len <= self.max_seq_len and self._valid(self.max_seq_len):
            return self.max_seq_len
        nb = -(-seq_len // self.block_size)
        return max(1 << (nb - 1).bit_length(), self.min_capacity_blocks) * self.block_size

    def _served_length(self, kv_len: int, causal: bool) -> int:
        """The length whose layout and plan ``kv_len`` shares: in causal use of
        a prefix-stable layout its block count (rounded up to whole blocks),
        so a decode loop groups rows once per block, not once per token."""
        if causal and self.prefix_stable:
            whole = -(-kv_len // self.block_size) * self.block_size
            if self.capacity(whole) == self.capacity(kv_len):
                return whole
        return kv_len

    def layout(self, kv_len: int, num_heads: int, device: torch.device, causal: bool) -> tuple[Tensor, Tensor]:
        kv_len = self._served_length(kv_len, causal)
        key = (kv_len, num_heads, device, causal)
        hit = self._layouts.get(key)
        if hit is not None:
            return hit
        with real_tensors():  # whatever mode traces the caller (export, vmap): cached tensors are real
            hit = self._fetch(kv_len, num_heads, device, causal)
        hit = self._layouts.put(key, hit)
        return hit

    def _fetch(self, kv_len: int, num_heads: int, device: torch.device, causal: bool) -> tuple[Tensor, Tensor]:
        if causal and self.prefix_stable:
            pattern = self.store.get(self.spec(self.capacity(kv_len), num_heads), device)
            # Bidirectional rows also hold later blocks: the causal rule drops
            # them, so every kept entry lies inside the first rows' blocks.
            hit = drop_future_blocks(*prefix_rows(pattern["kv_num_blocks"], pattern["kv_indices"],
                                                  -(-kv_len // self.block_size)))
        else:
            pattern = self.store.get(self.spec(kv_len, num_heads), device)
            hit = (pattern["kv_num_blocks"], pattern["kv_indices"])
            if causal:  # once here, not at every call (the tiles trust it)
                hit = drop_future_blocks(*hit)
        return hit

    def plan(self, kv_len: int, num_heads: int, device: torch.device, causal: bool, first_block: int) -> LayoutPlan:
        """``layout(...)`` and its row groups from query block ``first_block``
        (``kv_len - q_len`` over the block size), grouped once and kept."""
        if device.type == "meta":
            # Shape inference (a model built on meta, a trace-time warm-up): grouped on the CPU, moved to meta,
            # whose values are never read.
            plan = self.plan(kv_len, num_heads, torch.device("cpu"), causal, first_block)
            return LayoutPlan(plan.kv_num_blocks.to(device), plan.kv_indices.to(device),
                              [(rows.to(device), keys.to(device)) for rows, keys in plan.groups])
        kv_len = self._served_length(kv_len, causal)
        key = (kv_len, num_heads, device, causal, first_block)
        hit = self._plans.get(key)
        if hit is None:
            layout = self.layout(kv_len, num_heads, device, causal)
            with real_tensors():
                hit = LayoutPlan(*layout, row_groups(*layout, False, first_block))
            hit = self._plans.put(key, hit)
        return hit

    def block_mask(self, seq_len: int, num_heads: int, device: torch.device, causal: bool, padded: bool):
        """The ``BlockMask`` of ``layout(seq_len, ...)`` (``padded``: every
        block partial, for a key_padding_mask), built once and kept (the last
        MAX_BLOCK_MASKS used): a steady-state call is this dict lookup."""
        key = (seq_len, num_heads, device, causal, padded)
        hit = self._block_masks.get(key)
        if hit is None:
            layout = self.layout(seq_len, num_heads, device, causal)
            with real_tensors():
                    hit = block_mask_from_csr(*layout, block_size=self.block_size, q_len=seq_len, kv_len=seq_len,
                                          causal=causal, padded=padded)
            hit = self._block_masks.put(key, hit)
        return hit


# Sources by description: a cache, never the only way to a layout (any
# process rebuilds a source from its description). Strong and bounded, so a
# program that holds no module (an exported one) keeps its layouts too.
MAX_SOURCES = 64
SOURCES: BoundedCache[LayoutSource] = process_cache(MAX_SOURCES)


def source(description: str, store: Optional[PatternStore] = None) -> LayoutSource:
    """The process's ``LayoutSource`` of ``description`` (made on first use)."""
    hit = SOURCES.get(description)
    if hit is None:
        hit = SOURCES.put(description, LayoutSource(description, store))
    return hit


@torch.compiler.assume_constant_result
def baked_plan(description: str, kv_len: int, num_heads: int, device: str, causal: bool,
               first_block: int) -> tuple[Tensor, ...]:
    """``LayoutSource.plan`` flattened, ``(kv_num_blocks, kv_indices, rows_0,
    keys_0, rows_1, ...)``: called by dynamo at trace time, its tensors held by
    the graph as constants (module docstring)."""
    plan = source(description).plan(kv_len, num_heads, torch.device(device), causal, first_block)
    return (plan.kv_num_blocks, plan.kv_indices, *(t for group in plan.groups for t in group))


def unflatten_plan(flat: tuple[Tensor, ...]) -> LayoutPlan:
    """The ``LayoutPlan`` of ``baked_plan``'s tuple."""
    return LayoutPlan(flat[0], flat[1], [(flat[i], flat[i + 1]) for i in range(2, len(flat), 2)])


@torch.compiler.assume_constant_result
def baked_block_mask(description: str, seq_len: int, num_heads: int, device: str, causal: bool,
                     padded: bool) -> tuple[Tensor, ...]:
    """The ``BLOCK_MASK_FIELDS`` arrays of ``LayoutSource.block_mask``, as
    trace-time constants (as ``baked_plan``)."""
    mask = source(description).block_mask(seq_len, num_heads, torch.device(device), causal, padded)
    return tuple(getattr(mask, name) for name in BLOCK_MASK_FIELDS)

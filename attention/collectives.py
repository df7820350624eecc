"""torch.distributed pieces of sequence-parallel attention (docs/design.md section 6).

- ``all_gather`` / ``reduce_scatter``: the tensor collectives along dim 0,
  under whichever names this torch has.
- ``segment_group``: the process group of the ranks that share one segment,
  created once (only its members take part: ``use_local_synchronization``).
- ``agree_on_shapes``: every rank learns every rank's chunk shape, so a
  mismatch raises the same error on every rank instead of a hang.

Every collective runs in a group created with a finite timeout; a rank that
never arrives makes the others fail after that timeout, never hang.
"""

from __future__ import annotations

import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["all_gather", "reduce_scatter", "segment_group", "agree_on_shapes", "require_initialized"]

# ``all_gather(out [w*m, ...], mine [m, ...], group=)`` and
# ``reduce_scatter(mine [m, ...], full [w*m, ...], group=)``: torch 2.13 renamed
# them (the old names warn); older torch (>=2.4 is supported) has only the old.
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def require_initialized(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """The group to use (the default group for None), or a clear error."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group "
            "(e.g. under torchrun) before using a distributed attention module"
        )
    return process_group if process_group is not None else dist.group.WORLD


# default group -> {global ranks: subgroup}. Weakly keyed: once
# destroy_process_group drops the default group, its subgroups are released
# right then, while the interpreter is whole, and are never handed out again.
# Holding them until exit leaves gloo tearing its threads down during
# interpreter finalization, which can abort the process.
_SEGMENT_GROUPS: weakref.WeakKeyDictionary[dist.ProcessGroup, dict[tuple[int, ...], dist.ProcessGroup]] = (
    weakref.WeakKeyDictionary()
)


def segment_group(global_ranks: tuple[int, ...], timeout: timedelta) -> dist.ProcessGroup:
    """The process group of ``global_ranks``, created on first use by exactly
    those ranks (so ranks of other segments need not take part) and kept for
    the life of the default group."""
    groups = _SEGMENT_GROUPS.setdefault(dist.group.WORLD, {})
    group = groups.get(global_ranks)
    if group is None:
        group = groups[global_ranks] = dist.new_group(
            list(global_ranks), timeout=timeout, use_local_synchronization=True
        )
    return group


def agree_on_shapes(
    description: list[int], group: dist.ProcessGroup, device: torch.device, what: str
) -> None:
    """All-gather ``description`` (ints, as a tensor on ``device``: the
    backend's device); raise ``ValueError`` on every rank if any rank's
    differs, naming each rank's values."""
    mine = torch.tensor(description, dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    everyone = mine.new_empty(world * mine.numel())
    all_gather(everyone, mine, group=group)
    rows = everyone.view(world, -1)
    if not bool((rows == mine).all()):
        listing = "; ".join(f"rank {r}: {row}" for r, row in enumerate(rows.tolist()))
        raise ValueError(f"every rank must pass {what}; got {listing}")

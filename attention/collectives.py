"""torch.distributed pieces of sequence-parallel attention (DESIGN.md section 5).

- ``gather_rows``: autograd-aware all-gather along dim 0 inside a process
  group (forward all-gather, backward reduce-scatter of the gradient).
- ``segment_group``: the process group of the ranks that share one segment,
  created once (only its members take part: ``use_local_synchronization``).
- ``agree_on_shapes``: every rank learns every rank's chunk shape, so a
  mismatch raises the same error on every rank instead of a hang.

Every collective runs in a group created with a finite timeout; a rank that
never arrives makes the others fail after that timeout, never hang.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["gather_rows", "segment_group", "agree_on_shapes", "require_initialized"]


def require_initialized(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """The group to use (the default group for None), or a clear error."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group "
            "(e.g. under torchrun) before using a distributed attention module"
        )
    return process_group if process_group is not None else dist.group.WORLD


class _GatherRows(torch.autograd.Function):
    """rows ``[m, ...]`` on each of the ``w`` ranks -> ``[w * m, ...]``, rank order."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        world = dist.get_world_size(group)
        out = rows.new_empty((world * rows.shape[0], *rows.shape[1:]))
        dist.all_gather_into_tensor(out, rows.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        world = dist.get_world_size(ctx.group)
        mine = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        dist.reduce_scatter_tensor(mine, grad.contiguous(), group=ctx.group)
        return mine, None


def gather_rows(rows: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather ``rows [m, ...]`` (same m on every rank) into ``[world * m, ...]``;
    the gradient of the result is summed over ranks back onto each rank's rows."""
    return _GatherRows.apply(rows, group)


_SEGMENT_GROUPS: dict[tuple[object, tuple[int, ...]], dist.ProcessGroup] = {}


def segment_group(global_ranks: tuple[int, ...], timeout: timedelta) -> dist.ProcessGroup:
    """The process group of ``global_ranks``, created on first use by exactly
    those ranks (so ranks of other segments need not take part) and kept."""
    cache_key = (dist.group.WORLD, global_ranks)  # a new default group invalidates old entries
    group = _SEGMENT_GROUPS.get(cache_key)
    if group is None:
        group = dist.new_group(list(global_ranks), timeout=timeout, use_local_synchronization=True)
        _SEGMENT_GROUPS[cache_key] = group
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
    dist.all_gather_into_tensor(everyone, mine, group=group)
    rows = everyone.view(world, -1)
    if not bool((rows == mine).all()):
        listing = "; ".join(f"rank {r}: {row}" for r, row in enumerate(rows.tolist()))
        raise ValueError(f"every rank must pass {what}; got {listing}")

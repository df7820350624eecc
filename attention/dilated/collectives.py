"""torch.distributed pieces of sequence-parallel attention (docs/design.md section 6).

- ``all_gather`` / ``reduce_scatter``: the tensor collectives along dim 0 in
  a ``TimedGroup``; a failure (a timeout included) raises
  ``CollectiveError`` naming the collective, the group's ranks and its
  timeout.
- ``timed_group``: the process group of some global ranks with a given
  timeout, created once (only its members take part:
  ``use_local_synchronization``).
- ``agree_on_shapes``: every rank learns every rank's chunk shape, so a
  mismatch raises the same error on every rank instead of a hang.

Timeouts: every collective of the distributed module runs in a group created
here with the module's ``timeout``, the shape agreement included (never in
the default group, whose timeout is its creator's, 30 minutes by default),
and so does the creation of those groups. A rank that never arrives makes
the others fail after about ``timeout``, never hang. Limit: gloo's timeout
counts per operation; NCCL's watchdog may also abort the process.
"""

from __future__ import annotations

import weakref
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = ["TimedGroup", "CollectiveError", "all_gather", "reduce_scatter", "timed_group", "agree_on_shapes",
           "require_initialized"]

# ``all_gather(out [w*m, ...], mine [m, ...], group=)`` and
# ``reduce_scatter(mine [m, ...], full [w*m, ...], group=)``: torch 2.13 renamed
# them (the old names warn), 2.11 has only the old (docs/design.md section 10).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CollectiveError(RuntimeError):
    """A collective (or a group's creation) failed or timed out; the message
    names it, the group's global ranks and its timeout."""


class TimedGroup(NamedTuple):
    group: dist.ProcessGroup
    ranks: tuple[int, ...]      # global ranks, in group rank order
    timeout: timedelta

    def describe(self) -> str:
        return _describe(self.ranks, self.timeout)


def _describe(ranks: tuple[int, ...], timeout: timedelta) -> str:
    return f"the process group of global ranks {list(ranks)} (timeout {timeout.total_seconds():g} s)"


def _run(name: str, group: TimedGroup, function, *args) -> None:
    try:
        function(*args, group=group.group)
    except RuntimeError as error:  # gloo's timeouts are plain RuntimeErrors, NCCL's DistBackendErrors
        raise CollectiveError(f"{name} in {group.describe()} failed: {error}") from error


def all_gather(out: torch.Tensor, mine: torch.Tensor, group: TimedGroup) -> None:
    """``out`` [w*m, ...] gets every rank's ``mine`` [m, ...], in group rank order."""
    _run("all_gather", group, _all_gather, out, mine)


def reduce_scatter(full: torch.Tensor, group: TimedGroup) -> torch.Tensor:
    """This rank's block [m, ...] of the sum over ranks of ``full`` [w*m, ...].

    Out of place, as a custom op: inside a ``torch.func`` transform a
    backward's tensors are the transform's wrappers, and c10d's in-place
    collective into one raises ("would mutate a captured Tensor"); the op
    runs on the plain tensors beneath. No gradient flows through it (a
    backward's own gradient is not supported)."""
    with torch.no_grad():
        return torch.ops.attention.reduce_scatter_rows(full, list(group.ranks), group.timeout.total_seconds())


@torch.library.custom_op("attention::reduce_scatter_rows", mutates_args=())
def _reduce_scatter_rows(full: torch.Tensor, ranks: list[int], timeout_seconds: float) -> torch.Tensor:
    group = timed_group(tuple(ranks), timedelta(seconds=timeout_seconds))
    mine = full.new_empty(full.shape[0] // len(ranks), *full.shape[1:])
    _run("reduce_scatter", group, _reduce_scatter, mine, full)
    return mine


@_reduce_scatter_rows.register_fake
def _(full, ranks, timeout_seconds):
    return full.new_empty(full.shape[0] // len(ranks), *full.shape[1:])


def require_initialized(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """The group to use (the default group for None), or a clear error."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group "
            "(e.g. under torchrun) before using a distributed attention module"
        )
    return process_group if process_group is not None else dist.group.WORLD


# default group -> {(global ranks, timeout): group}. Weakly keyed: once
# destroy_process_group drops the default group, its subgroups are released
# right then, while the interpreter is whole, and are never handed out again.
# Holding them until exit leaves gloo tearing its threads down during
# interpreter finalization, which can abort the process.
_GROUPS: weakref.WeakKeyDictionary[dist.ProcessGroup, dict[tuple[tuple[int, ...], timedelta], TimedGroup]] = (
    weakref.WeakKeyDictionary()
)


def timed_group(global_ranks: tuple[int, ...], timeout: timedelta) -> TimedGroup:
    """The process group of ``global_ranks`` with ``timeout``, created on
    first use by exactly those ranks (so other ranks need not take part) and
    kept for the life of the default group."""
    groups = _GROUPS.setdefault(dist.group.WORLD, {})
    found = groups.get((global_ranks, timeout))
    if found is None:
        try:
            group = dist.new_group(list(global_ranks), timeout=timeout, use_local_synchronization=True)
        except RuntimeError as error:  # the store's wait timing out
            raise CollectiveError(f"creating {_describe(global_ranks, timeout)} failed: {error}") from error
        found = groups[(global_ranks, timeout)] = TimedGroup(group, global_ranks, timeout)
    return found


def agree_on_shapes(
    description: list[int], group: TimedGroup, device: torch.device, what: str
) -> None:
    """All-gather ``description`` (ints, as a tensor on ``device``: the
    backend's device); raise ``ValueError`` on every rank if any rank's
    differs, naming each rank's values."""
    mine = torch.tensor(description, dtype=torch.int64, device=device)
    world = len(group.ranks)
    everyone = mine.new_empty(world * mine.numel())
    all_gather(everyone, mine, group)
    rows = everyone.view(world, -1)
    if not bool((rows == mine).all()):
        listing = "; ".join(f"rank {r}: {row}" for r, row in enumerate(rows.tolist()))
        raise ValueError(f"every rank must pass {what}; got {listing}")

"""``Pattern``: a spec and the named int32 arrays generated from it.

A plain data object, like FlexAttention's ``BlockMask``: it holds tensors and
knows how to move them, nothing else. State (caching, device copies, tamper
checks) lives in the store.

Arrays by spec kind:

- ``DilatedSpec`` (one row per (branch, head group), independent of the
  sequence length):
    ``groups``    int32 ``[G, 6]``: ``patternstore.dilated_groups``' schema
    (its columns ``GROUP_COLUMNS``); the attention code derives the
    length-dependent numbers from it at call time.
- ``SparseSpec`` (a CSR block layout, docs/design.md section 2.2):
    ``kv_num_blocks`` int32 ``[H, nb]``: active key blocks of each query block;
    ``kv_indices``    int32 ``[sum(kv_num_blocks)]``: the rows back to back,
    head-major, each sorted ascending. ``H`` is ``spec.layout_heads`` (1 when
    all heads share the layout).
"""

from __future__ import annotations

import ctypes
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ContextManager, Iterator, Mapping

import torch
from torch._ops import _len_torch_dispatch_stack_pre_dispatch
from torch.utils._python_dispatch import _disable_current_modes

from .specs import Spec

PACK_ALIGN = 16  # bytes; every packed array starts at a multiple, so any dtype can view it

def real_tensors() -> ContextManager[None]:
    """Tensors made inside are real tensors with autograd and version
    counting, whatever the caller runs under: ``torch.inference_mode`` (whose
    tensors have no ``_version``, which the memory tier's tamper check reads),
    or fake and other dispatch modes (``torch.export``, ``FakeTensorMode``),
    and ``torch.func`` transforms (``grad``, ``vjp``, ``vmap``), whose tensors
    have no data to read or write. The store makes and reads its own tensors
    only inside this (never on a memory hit: no cost there).
    Outside any such mode it is a no-op: checking costs 1 us, entering the
    modes' exits 12 us (measured here), and a disk hit nests a few."""
    if (torch._C._len_torch_dispatch_stack() or _len_torch_dispatch_stack_pre_dispatch()
            or torch.is_inference_mode_enabled() or torch._C._functorch.peek_interpreter_stack() is not None):
        return _outside_modes()
    return nullcontext()


@contextmanager
def _outside_modes() -> Iterator[None]:
    with _disable_current_modes(), torch.inference_mode(False), torch._C._DisableFuncTorch():
        yield


# One array's place in a packed buffer: (name, dtype, shape, byte offset, nbytes).
Slot = tuple[str, torch.dtype, tuple[int, ...], int, int]


@dataclass(frozen=True, eq=False)
class Pattern:
    """``spec`` plus ``arrays``: name -> int32 tensor (CPU unless moved)."""

    spec: Spec
    arrays: Mapping[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.arrays[name]

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.arrays.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.arrays.values())).device

    def to(self, device: torch.device | str) -> "Pattern":
        """A copy of this pattern with every array on ``device``."""
        device = torch.device(device)
        return Pattern(self.spec, {name: t.to(device, copy=True) for name, t in self.arrays.items()})

    def equals(self, other: "Pattern") -> bool:
        """Same key and bit-identical arrays."""
        return (
            self.key == other.key
            and self.arrays.keys() == other.arrays.keys()
            and all(
                self.arrays[n].dtype == other.arrays[n].dtype
                and self.arrays[n].shape == other.arrays[n].shape
                and torch.equal(self.arrays[n].cpu(), other.arrays[n].cpu())
                for n in self.arrays
            )
        )

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}={tuple(t.shape)}" for n, t in self.arrays.items())
        return f"Pattern({self.key}, {shapes}, nbytes={self.nbytes})"


@dataclass(frozen=True, eq=False)
class PackedPattern:
    """A pattern whose arrays all live in one byte buffer: ``buffer`` uint8
    ``[size]`` on one device, array ``name`` at ``slots`` ``(name, dtype,
    shape, byte offset, nbytes)``, each offset a multiple of ``PACK_ALIGN``.
    One buffer means one allocation, one transfer to a device, and one
    ``buffer._version`` that every in-place write to any array bumps."""

    spec: Spec
    buffer: torch.Tensor
    slots: tuple[Slot, ...]

    @staticmethod
    def layout(arrays: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[tuple[Slot, ...], int]:
        """(slots, buffer bytes) of arrays ``name -> (dtype, shape)`` packed in
        order, each at a multiple of ``PACK_ALIGN``."""
        slots, end = [], 0
        for name, (dtype, shape) in arrays.items():
            size = math.prod(shape) * dtype.itemsize
            slots.append((name, dtype, tuple(shape), end, size))
            end += -(-size // PACK_ALIGN) * PACK_ALIGN
        return tuple(slots), end

    @classmethod
    def empty(cls, spec: Spec, arrays: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> "PackedPattern":
        """An uninitialized CPU buffer for arrays ``name -> (dtype, shape)``, in order."""
        slots, size = cls.layout(arrays)
        return cls(spec, torch.empty(size, dtype=torch.uint8), slots)

    @classmethod
    def over(cls, spec: Spec, buffer: torch.Tensor, arrays: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> "PackedPattern":
        """Arrays ``name -> (dtype, shape)`` laid out in ``buffer`` (uint8, 1-D,
        its first byte aligned to ``PACK_ALIGN``), which the result views: no
        copy. ``ValueError`` when ``buffer`` is not exactly the layout's size."""
        slots, size = cls.layout(arrays)
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() != size:
            raise ValueError(f"buffer must be uint8 of {size} bytes, got {buffer.dtype} {tuple(buffer.shape)}")
        if buffer.data_ptr() % PACK_ALIGN:
            raise ValueError(f"buffer must start at a multiple of {PACK_ALIGN} bytes")
        return cls(spec, buffer, slots)

    @classmethod
    def copy_of(cls, pattern: Pattern) -> "PackedPattern":
        """``pattern``'s arrays copied into one fresh CPU buffer."""
        packed = cls.empty(pattern.spec, {name: (t.dtype, tuple(t.shape)) for name, t in pattern.arrays.items()})
        for (_, _, _, offset, size), tensor in zip(packed.slots, pattern.arrays.values()):
            if size:
                # One plain memcpy: torch's copy_ would start its thread pool,
                # which stalls for milliseconds on a loaded machine.
                source = tensor.detach().to("cpu").contiguous()
                ctypes.memmove(packed.buffer.data_ptr() + offset, source.data_ptr(), size)
        return packed

    def views(self) -> dict[str, torch.Tensor]:
        """name -> the array, a view of ``buffer``."""
        return {
            name: self.buffer[offset : offset + size].view(dtype).view(shape)
            for name, dtype, shape, offset, size in self.slots
        }

    def to(self, device: torch.device) -> "PackedPattern":
        """The same arrays on ``device``: one transfer of the whole buffer."""
        return PackedPattern(self.spec, self.buffer.to(device, copy=True), self.slots)

    def unpack(self) -> Pattern:
        """The plain ``Pattern`` of these arrays (views of ``buffer``, not copies)."""
        return Pattern(self.spec, self.views())

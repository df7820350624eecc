"""The residue order of a dilated pattern (docs/design.md section 2.1).

Order the n positions by ``(position mod R, position)`` with ``R`` the least
common multiple of the plan's rates. Residue class ``c`` then holds the
positions ``c, c + R, c + 2R, ...`` back to back: with ``n = a * R + t``
(``0 <= t < R``) classes ``c < t`` hold ``a + 1`` positions and the others
``a``, so class ``c`` starts at index ``c * a + min(c, t)`` and position ``p``
sits at index ``start(p mod R) + p // R``. Both directions are index
arithmetic (``residue_index``, ``residue_position``), usable on int tensors
inside a compiled region or a flex mod; ``residue_order`` and
``residue_inverse`` make them tensors where a gather needs one.

Why this order: a branch (w, r) with head offset o selects, in segment t of
``s = min(w, n)`` positions, the positions ``p`` with ``p - t*s = o (mod
r)``; since ``r`` divides ``R`` that is a set of whole residue classes, and a
class's positions inside one segment are ONE contiguous run of indices. So a
branch's selected pairs are whole rectangles (run x run) of the reordered
score matrix, and the ``M > 0`` mask is block-sparse there
(``attention.dilated.residue_layout``).

Ordered mode: every op of a transformer layer other than attention is per
position, so a model may keep its activations in residue order end to end
(``to_residue_order`` after the embedding, ``from_residue_order`` before the
loss) and give RoPE the permuted position ids ``residue_order(n, R)``. The
order depends on n (the class starts do), so it is one order per length.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from patternstore.fields import as_int

__all__ = [
    "residue_modulus",
    "residue_index",
    "residue_position",
    "residue_order",
    "residue_inverse",
    "to_residue_order",
    "from_residue_order",
]


def residue_modulus(rates: Iterable[int]) -> int:
    """R: the least common multiple of the dilation rates (each an int >= 1)."""
    rates = tuple(rates)
    if not rates or any(as_int(r) is None or as_int(r) < 1 for r in rates):
        raise ValueError(f"dilation rates must be a non-empty sequence of ints >= 1, got {rates!r}")
    return math.lcm(*(as_int(r) for r in rates))


def _check_length(seq_len: int, modulus: int) -> None:
    # A SymInt is a length under torch.compile(dynamic=True): the compare becomes a guard.
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, torch.SymInt)) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if as_int(modulus) is None or as_int(modulus) < 1:
        raise ValueError(f"modulus must be an int >= 1 (the lcm of the rates), got {modulus!r}")


def residue_index(position: Tensor, seq_len: int, modulus: int) -> Tensor:
    """The index in residue order of each position (int tensor in [0, n))."""
    per_class, longer = seq_len // modulus, seq_len % modulus  # classes < longer hold per_class + 1
    residue = position % modulus
    return residue * per_class + residue.clamp(max=longer) + position // modulus


def residue_position(index: Tensor, seq_len: int, modulus: int) -> Tensor:
    """The position at each index of the residue order (``residue_index``'s inverse)."""
    per_class, longer = seq_len // modulus, seq_len % modulus
    long_part = longer * (per_class + 1)  # indices of the classes that hold one more
    rest = index - long_part
    # No index reaches the short classes when per_class == 0. A tensor seq_len: one length per index
    # (packed documents, attention.dilated.packed_flex).
    short = per_class.clamp(min=1) if isinstance(per_class, Tensor) else max(per_class, 1)
    in_long = index < long_part
    residue = torch.where(in_long, index // (per_class + 1), longer + rest // short)
    step = torch.where(in_long, index % (per_class + 1), rest % short)
    return residue + modulus * step


def residue_order(seq_len: int, modulus: int, device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """int64 ``(n,)``: the position at each index of the residue order. It is
    also the position ids (e.g. for RoPE) of a sequence kept in residue order."""
    _check_length(seq_len, modulus)
    return residue_position(torch.arange(seq_len, device=device), seq_len, modulus)


def residue_inverse(seq_len: int, modulus: int, device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """int64 ``(n,)``: the residue-order index of each position."""
    _check_length(seq_len, modulus)
    return residue_index(torch.arange(seq_len, device=device), seq_len, modulus)


def _check_dim(x: Tensor, dim: int) -> int:
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if as_int(dim) is None or not -x.dim() <= as_int(dim) < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-d tensor, got {dim!r}")
    return as_int(dim) % x.dim()


def to_residue_order(x: Tensor, modulus: int, dim: int = 1) -> Tensor:
    """``x`` (e.g. ``(batch, n, ...)``) with its ``dim`` reordered by residue: one gather."""
    dim = _check_dim(x, dim)
    return x.index_select(dim, residue_order(x.shape[dim], modulus, x.device))


def from_residue_order(x: Tensor, modulus: int, dim: int = 1) -> Tensor:
    """``to_residue_order``'s inverse: ``x``'s ``dim`` back in natural order."""
    dim = _check_dim(x, dim)
    return x.index_select(dim, residue_inverse(x.shape[dim], modulus, x.device))

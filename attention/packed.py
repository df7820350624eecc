"""Packed documents: the one validation of ``cu_seqlens``.

A packed (padding-free) batch is one sequence of ``total`` tokens holding
documents back to back; ``cu_seqlens = [0, end_1, ..., total]`` (1-D, an
integer dtype, as in FlashAttention's varlen functions and
``torch.nn.attention.varlen.varlen_attn``) gives their boundaries: document
``i`` is ``[cu[i], cu[i+1])``. Empty documents (two equal boundaries) are
allowed. Packed self-attention takes batch 1 and ``q_len == kv_len == total``.

Guarantees:
- ``check_cu_seqlens`` reads only the tensor's metadata (type, shape, dtype,
  device) and the inputs' shapes, so it runs at trace time and under
  ``torch.compile`` without a graph break.
- ``document_bounds`` reads the values on the host (one device sync when
  ``cu_seqlens`` lives on a GPU; none when it is a CPU tensor, which is why a
  CPU ``cu_seqlens`` is accepted beside a GPU ``q``) and raises ValueError
  naming the field unless they start at 0, never decrease and end at
  ``total``. Both raise before any work.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_cu_seqlens", "document_bounds"]


def check_cu_seqlens(cu_seqlens: object, q: Tensor, k: Tensor) -> Tensor:
    """``cu_seqlens`` as given, after the checks that need no value: a 1-D
    integer tensor of at least one boundary pair, on q's device or the CPU,
    with batch 1 and ``q_len == kv_len`` (a packed batch attends to itself)."""
    if not isinstance(cu_seqlens, Tensor):
        raise ValueError(f"cu_seqlens must be a 1-D integer torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least 2 boundaries [0, ..., total], got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must have an integer dtype (int32 or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.device != q.device and cu_seqlens.device.type != "cpu":
        raise ValueError(f"cu_seqlens must be on q's device ({q.device}) or the CPU, got {cu_seqlens.device}")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens the batch must be 1 (documents are packed along the sequence), got batch {q.shape[0]}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"with cu_seqlens q_len must equal kv_len (packed self-attention), got q_len={q.shape[1]}, kv_len={k.shape[1]}"
        )
    return cu_seqlens


def document_bounds(cu_seqlens: Tensor, total: int) -> list[int]:
    """The boundaries as Python ints, checked: ``cu[0] == 0``, never
    decreasing, ``cu[-1] == total``."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    for i in range(1, len(bounds)):
        if bounds[i] < bounds[i - 1]:
            raise ValueError(
                f"cu_seqlens must not decrease, got cu_seqlens[{i - 1}]={bounds[i - 1]} > cu_seqlens[{i}]={bounds[i]}"
            )
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens must end at the sequence length {total}, got {bounds[-1]}")
    return bounds

"""Attention sinks and logit soft-capping: the two score changes today's
models add to softmax attention (docs/design.md section 2.4).

Soft-capping (Gemma 2's ``attn_logit_softcapping``) bounds each scaled score
``s`` before the softmax: ``c * tanh(s / c)``; its derivative ``1 -
tanh(s / c)^2`` multiplies ``dS`` in a backward. It changes every score, so
it lives inside a kernel (``attention.kernels``: the kernels whose entry says
``softcap``).

A sink (gpt-oss's ``s_aux``) is one logit ``z_h`` per head that joins every
row's softmax denominator and nothing else: a key with score ``z_h`` and a
zero value. So it is one more disjoint part of the softmax, merged after all
the others, from the final ``(out, lse)`` of a row:

    lse' = logaddexp(lse, z),   out' = out * exp(lse - lse') = out * sigmoid(lse - z).

Guarantees:
- ``apply_sinks`` gives exactly that; a row with no key (lse ``EMPTY_LSE``)
  keeps out 0 and gets ``lse' = z``.
- Gradients: the backward of the keys, fed the FINAL ``(out', lse')`` as
  every backward here is (``kernels.attend_backward``), is already exact for
  q, k and v (the sink is a key with a zero value: it adds nothing to
  ``dO v^T`` and is inside ``lse'``). The sink's own gradient is
  ``dz = -sum over rows of exp(z - lse') * rowsum(dO * out')``
  (``sinks_grad``), summed over batch rows and positions per head.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["apply_sinks", "sinks_grad", "soft_cap"]


def soft_cap(scores: Tensor, softcap: Optional[float]) -> Tensor:
    """``softcap * tanh(scores / softcap)``, or ``scores`` when ``softcap`` is None."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """``(out', lse')`` of the module docstring: ``out (..., heads, d_v)``,
    ``lse (..., heads)``, ``sinks (heads,)``; new tensors in out's and lse's
    dtypes."""
    z = sinks.to(lse.dtype)
    weight = (lse - z).sigmoid()
    return out * weight.unsqueeze(-1).to(out.dtype), torch.logaddexp(lse, z)


def sinks_grad(grad_out: Tensor, out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """``dz (heads,)`` in sinks' dtype, from the FINAL ``out' (..., heads,
    d_v)`` and ``lse' (..., heads)`` (module docstring)."""
    wide = lse.dtype
    rows = (grad_out.to(wide) * out.to(wide)).sum(-1)
    share = (sinks.to(wide) - lse).exp()  # the sink's probability in each row
    return -(share * rows).reshape(-1, sinks.shape[0]).sum(0).to(sinks.dtype)

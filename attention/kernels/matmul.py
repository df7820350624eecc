"""The explicit attention kernel: scores, softmax and products written out
in ``accumulate_dtype``. It takes everything the layer can ask for (any
device, dtype and head_dim, a value head_dim different from q/k's,
bottom-right causal with fewer queries than keys, key and structural masks,
a dropout keep mask), so ``attention.kernels.choose_kernel`` always has it
to fall back to.

Arguments (the kernel table's convention, ``attention/kernels/attend.py``): q ``(B,
H, M, d)``, k ``(B, H, N, d)``, v ``(B, H, N, d_v)`` (the layer hands equal
head counts to a kernel without native GQA); ``causal``: query row ``i`` is
position ``N - M + i``; ``masked``: None or bool broadcastable to ``(B, H,
M, N)``, True = excluded; ``keep``: None or the dropout factors
``keep / (1 - p)`` broadcastable to ``(B, H, M, N)``, applied to the
probabilities after the softmax (the lse is the undropped one);
``softcap``: None or c > 0, scores ``c * tanh(s / c)`` before the masks
(``attention.kernels.sinks``).

Guarantees: masked and causally excluded scores are FILLED with -inf, never
added to, so a NaN or Inf in an excluded key never reaches the output or the
lse. A row with no key gets out 0 and lse ``EMPTY_LSE``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from attention.kernels.softmax_parts import EMPTY_LSE, accumulate_dtype
from attention.kernels.sinks import soft_cap

__all__ = ["matmul_forward", "matmul_backward"]

_NEG_INF = float("-inf")


def _scores(q: Tensor, k: Tensor, scale: float, causal: bool, masked: Optional[Tensor],
            softcap: Optional[float]) -> Tensor:
    """(B, H, M, N) scaled (and capped) scores, excluded entries -inf."""
    s = soft_cap((q @ k.transpose(-1, -2)) * scale, softcap)
    m, n = s.shape[-2:]
    if causal:
        future = torch.ones(m, n, dtype=torch.bool, device=s.device).triu(n - m + 1)
        s = s.masked_fill(future, _NEG_INF)
    if masked is not None:
        s = s.masked_fill(masked, _NEG_INF)
    return s


def matmul_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, masked: Optional[Tensor],
                   keep: Optional[Tensor], softcap: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """``(out (B, H, M, d_v), lse (B, H, M))`` in ``accumulate_dtype(q.dtype)``."""
    acc = accumulate_dtype(q.dtype)
    q, k, v = (x.to(acc) for x in (q, k, v))
    s = _scores(q, k, scale, causal, masked, softcap)
    peak = s.amax(-1, keepdim=True)
    peak = peak.masked_fill(peak == _NEG_INF, 0.0)
    e = (s - peak).exp()
    total = e.sum(-1, keepdim=True)
    if keep is not None:
        e = e * keep.to(acc)
    out = (e @ v) / total.clamp_min(torch.finfo(total.dtype).tiny)
    lse = torch.where(total > 0, total.log() + peak, EMPTY_LSE).squeeze(-1)
    return out, lse


def matmul_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                    scale: float, masked: Optional[Tensor], keep: Optional[Tensor],
                    softcap: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` from the rows' FINAL ``out`` (the dropped output when
    ``keep`` is given) and ``lse``: with ``P = exp(S - lse)`` and the keep
    factors ``K``, ``dV = (P K)^T dO``, ``dS = P (K (dO V^T) - rowsum(dO out))``;
    with a soft-cap ``S = c tanh(X / c)`` of the scaled scores X, ``dX = dS (1 - (S / c)^2)``."""
    acc = accumulate_dtype(q.dtype)
    do, q, k, v, out = (x.to(acc) for x in (do, q, k, v, out))
    s = _scores(q, k, scale, causal, masked, softcap)
    p = (s - lse.to(acc).unsqueeze(-1)).exp()
    dp = do @ v.transpose(-1, -2)
    if keep is not None:
        kept = p * keep.to(acc)
        dv = kept.transpose(-1, -2) @ do
        ds = kept * dp - p * (do * out).sum(-1, keepdim=True)
    else:
        dv = p.transpose(-1, -2) @ do
        ds = p * (dp - (do * out).sum(-1, keepdim=True))
    if softcap is not None:  # excluded scores are -inf: their p is 0, and 0 * anything finite stays 0
        ds = ds * (1 - (s.masked_fill(p == 0, 0.0) / softcap).square())
    return ds @ k * scale, ds.transpose(-1, -2) @ q * scale, dv

"""Softmax attention split over disjoint key sets: the log-sum-exp of a row
with no key, the dtypes parts are computed and held in, and the merge of two
parts of the same rows.

Guarantee: merging the ``(out, lse)`` parts of disjoint key sets with
``merge_`` gives attention over their union, empty parts included (their
lse is the finite ``EMPTY_LSE``, so no merge makes a NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["EMPTY_LSE", "accumulate_dtype", "lse_dtype", "merge_"]

# The log-sum-exp of a row with no key: finite, so merges need no NaN guards
# (logaddexp(E, E) rounds to E, and a part with lse E gets weight 0 beside any
# real one), and exp(S - E) is still 0 for the -inf scores of such a row in a
# backward.
EMPTY_LSE = -1e30

_HALF = (torch.float16, torch.bfloat16)


# Two rules. Explicit arithmetic (the matmul kernel, the block-sparse gather
# tiles, the plain reference) computes in ``accumulate_dtype``: float32 for
# half types. Merged outputs and gradient sums that live as long as a whole
# call (the dilated fast path's output, dq, dk, dv) are held in the INPUT
# dtype: each fused kernel rounds its part to that dtype anyway, a merge
# computes its lerp in float32 and rounds once, so k parts cost k roundings
# instead of one (bf16, 4 branches: about 2x the error of one dense kernel,
# within tests/test_cuda.py's 2.5u bound), while a float32 output plus the
# final cast made the forward's peak 3.0x the output (H100 and CPU alike:
# tools/bench_gpu.py, tools/bench_memory.py; target 1.5x). The
# log-sum-exps stay float32 (``lse_dtype``).
def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The compute dtype of explicit arithmetic: float32 for half types, else the dtype itself."""
    return torch.float32 if dtype in _HALF else dtype


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-sum-exps: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_(out: Tensor, lse: Tensor, o: Tensor, l: Tensor) -> None:
    """Fold one part's ``(o, l)`` into the running ``(out, lse)`` of the same
    rows over a disjoint key set, in place:
    ``out <- out * exp(lse - new) + o * exp(l - new)``, ``new = logaddexp(lse, l)``.
    The two weights sum to 1, so that is one lerp with weight
    ``exp(l - new) = sigmoid(l - lse)``: one pass over the output and three
    small ops. Rows empty in both stay at EMPTY_LSE (finite: no NaN)."""
    weight = (l - lse).sigmoid_().unsqueeze(-1)
    torch.logaddexp(lse, l, out=lse)
    out.lerp_(o.to(out.dtype), weight.to(out.dtype))

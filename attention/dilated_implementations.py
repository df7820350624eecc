"""The implementations of dilated attention, by name: what
``DilatedAttention(implementation=...)`` runs. One function of the same
inputs, each entry a way to compute it:

- ``"reference"``: plain and autograd-native (``dilated_reference``): double
  backward works; under ``torch.compile`` (no dropout) it runs as one opaque
  op (``attention::dilated_reference``), so its graph is length-free too.
- ``"fast"``: fused kernels on strided views, in-place merge, memory bounded
  by chunking (``dilated_kernels``); a decode step costs the keys its row
  attends. Without dropout of its own: with dropout in training, the
  reference runs.
- ``"flex"``: one compiled FlexAttention call over the residue-ordered
  sequence (``dilated_flex``), for prefill (``q_len == kv_len``); decode and
  chunked prefill rows (and sequences shorter than one flex block) take
  ``"fast"``, whose views cost a row exactly its keys. FlexAttention compiles a backward on CUDA only: on the CPU it serves
  forwards without gradients (a call that needs them is refused).

An entry's ``forward(q, k, v, flat_plan, is_causal, scale, key_padding_mask,
dropout_p) -> out`` takes checked inputs and the flat plan
(``DilatedPlan.flat``); its capabilities say what the modules may ask of it.
A new implementation (another kernel path) is one more entry.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .dilated_flex import dilated_flex_attention
from .sparse import FLEX_MIN_BLOCK
from .dilated_ops import dilated_reference, fast_attention
from .dilated_plan import DilatedPlan
from .dilated_reference import reference_attention

__all__ = ["Implementation", "IMPLEMENTATIONS", "run_implementation"]


class Implementation(NamedTuple):
    forward: Callable[..., Tensor]
    dropout: bool           # applies attention dropout itself (else "reference" runs when dropout_p > 0)
    double_backward: bool   # gradients of gradients (eager)
    value_head_dim: bool    # v's head_dim may differ from q's and k's


def _reference_forward(q, k, v, flat_plan: Sequence[int], is_causal: bool, scale: float,
                       key_padding_mask: Optional[Tensor], dropout_p: float) -> Tensor:
    if torch.compiler.is_compiling() and dropout_p == 0:
        # One opaque op: the graph stays length-free (eager stays autograd-native).
        return dilated_reference(q, k, v, key_padding_mask, list(flat_plan), is_causal, scale)[0]
    plan = DilatedPlan.from_flat(q.shape[2], flat_plan)
    return reference_attention(q, k, v, plan, is_causal, scale, key_padding_mask, dropout_p)


def _fast_forward(q, k, v, flat_plan: Sequence[int], is_causal: bool, scale: float,
                  key_padding_mask: Optional[Tensor], dropout_p: float) -> Tensor:
    return fast_attention(q, k, v, flat_plan, is_causal, scale, key_padding_mask)


def _flex_forward(q, k, v, flat_plan: Sequence[int], is_causal: bool, scale: float,
                  key_padding_mask: Optional[Tensor], dropout_p: float) -> Tensor:
    if q.shape[1] != k.shape[1] or q.shape[1] < FLEX_MIN_BLOCK:
        return fast_attention(q, k, v, flat_plan, is_causal, scale, key_padding_mask)
    plan = DilatedPlan.from_flat(q.shape[2], flat_plan)
    return dilated_flex_attention(q, k, v, plan, is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "reference": Implementation(_reference_forward, dropout=True, double_backward=True, value_head_dim=True),
    "fast": Implementation(_fast_forward, dropout=False, double_backward=False, value_head_dim=True),
    "flex": Implementation(_flex_forward, dropout=False, double_backward=False, value_head_dim=True),
}


def run_implementation(name: str, q: Tensor, k: Tensor, v: Tensor, flat_plan: Sequence[int], is_causal: bool,
                       scale: float, key_padding_mask: Optional[Tensor], dropout_p: float) -> Tensor:
    """Implementation ``name`` on checked inputs; the reference where it needs dropout it lacks."""
    implementation = IMPLEMENTATIONS[name]
    if v.shape[-1] != q.shape[-1] and not implementation.value_head_dim:
        raise ValueError(f"implementation {name!r} needs v's head_dim equal to q's ({q.shape[-1]}); got {v.shape[-1]}")
    if dropout_p > 0 and not implementation.dropout:
        implementation = IMPLEMENTATIONS["reference"]
    return implementation.forward(q, k, v, flat_plan, is_causal, scale, key_padding_mask, dropout_p)

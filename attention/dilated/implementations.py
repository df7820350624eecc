"""The implementations of dilated attention, by name: what
``DilatedAttention(implementation=...)`` runs. One function of the same
inputs, each entry a way to compute it:

- ``"reference"``: plain and autograd-native (``attention.dilated.reference``): double
  backward works; under ``torch.compile`` (no dropout) it runs as one opaque
  op (``attention::dilated_reference``), so its graph is length-free too.
- ``"fast"``: fused kernels on strided views, in-place merge, memory bounded
  by chunking (``attention.dilated.fast``); a decode step costs the keys its row
  attends. Without dropout of its own: with dropout in training, the
  reference runs.
- ``"flex"``: one compiled FlexAttention call over the residue-ordered
  sequence (``attention.dilated.flex``), for prefill (``q_len == kv_len``); decode and
  chunked prefill rows (and sequences shorter than one flex block) take
  ``"fast"``, whose views cost a row exactly its keys. FlexAttention compiles a backward on CUDA only: on the CPU it serves
  forwards without gradients (a call that needs them is refused). ``torch.export`` of it is refused
  (``dilated_flex.FLEX_NOT_EXPORTED``; ``"auto"`` exports as ``"fast"``).

An entry's ``forward(q, k, v, flat_plan, is_causal, scale, key_padding_mask,
dropout_p, softcap, sinks) -> out`` takes checked inputs and the flat plan
(``DilatedPlan.flat``); its capabilities say what the modules may ask of it.
A soft-cap or sinks (``attention.kernels.sinks``) asked of an entry that lacks them
(``"flex"``) run on ``"fast"``, which computes the same function.
A new implementation (another kernel path) is one more entry.

``"auto"`` is not an entry but a choice made per call between ``"fast"`` and
``"flex"`` (``choose_implementation``), from the measured table
``FLEX_FASTER`` beside it.

Ordered mode (``ordered=True``): q, k, v, the padding mask and the output
are in residue order (``attention.residue``). ``"flex"`` takes them as they
are (no gathers); the others gather to natural order and back, so every
implementation computes the same function in either order.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from attention.dilated.flex import dilated_flex_attention
from attention.dilated.ops import dilated_reference, fast_attention
from attention.dilated.plan import DilatedPlan
from attention.dilated.reference import reference_attention
from attention.residue import from_residue_order, residue_modulus, to_residue_order
from attention.kernels.flex import FLEX_MIN_BLOCK

__all__ = ["Implementation", "IMPLEMENTATIONS", "IMPLEMENTATION_NAMES", "FlexFaster", "FLEX_FASTER",
           "choose_implementation", "run_implementation"]


class Implementation(NamedTuple):
    forward: Callable[..., Tensor]
    dropout: bool           # applies attention dropout itself (else "reference" runs when dropout_p > 0)
    double_backward: bool   # gradients of gradients (eager)
    value_head_dim: bool    # v's head_dim may differ from q's and k's
    softcap_sinks: bool     # takes a soft-cap and sinks (else "fast" runs when they are given)


def _reference_forward(q, k, v, flat_plan: Sequence[int], is_causal: bool, scale: float,
                       key_padding_mask: Optional[Tensor], dropout_p: float, softcap: Optional[float] = None,
                       sinks: Optional[Tensor] = None) -> Tensor:
    if torch.compiler.is_compiling() and dropout_p == 0:
        # One opaque op: the graph stays length-free (eager stays autograd-native).
        return dilated_reference(q, k, v, key_padding_mask, list(flat_plan), is_causal, scale, softcap, sinks)[0]
    plan = DilatedPlan.from_flat(q.shape[2], flat_plan)
    return reference_attention(q, k, v, plan, is_causal, scale, key_padding_mask, dropout_p, softcap=softcap,
                               sinks=sinks)


def _fast_forward(q, k, v, flat_plan: Sequence[int], is_causal: bool, scale: float,
                  key_padding_mask: Optional[Tensor], dropout_p: float, softcap: Optional[float] = None,
                  sinks: Optional[Tensor] = None) -> Tensor:
    return fast_attention(q, k, v, flat_plan, is_causal, scale, key_padding_mask, softcap, sinks)


def _flex_serves(q: Tensor, k: Tensor) -> bool:
    """Prefill of at least one flex block; decode and chunked-prefill rows take "fast"."""
    return q.shape[1] == k.shape[1] and q.shape[1] >= FLEX_MIN_BLOCK


def _flex_forward(q, k, v, flat_plan: Sequence[int], is_causal: bool, scale: float,
                  key_padding_mask: Optional[Tensor], dropout_p: float, softcap: None = None, sinks: None = None,
                  ordered: bool = False) -> Tensor:
    """(``run_implementation`` gives a soft-cap or sinks to "fast" instead: flex takes neither.)"""
    if not _flex_serves(q, k):
        return fast_attention(q, k, v, flat_plan, is_causal, scale, key_padding_mask)
    plan = DilatedPlan.from_flat(q.shape[2], flat_plan)
    return dilated_flex_attention(q, k, v, plan, is_causal=is_causal, scale=scale, key_padding_mask=key_padding_mask,
                                  ordered=ordered)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "reference": Implementation(_reference_forward, dropout=True, double_backward=True, value_head_dim=True,
                                softcap_sinks=True),
    "fast": Implementation(_fast_forward, dropout=False, double_backward=False, value_head_dim=True,
                           softcap_sinks=True),
    "flex": Implementation(_flex_forward, dropout=False, double_backward=False, value_head_dim=True,
                           softcap_sinks=False),
}


IMPLEMENTATION_NAMES: tuple[str, ...] = (*IMPLEMENTATIONS, "auto")


class FlexFaster(NamedTuple):
    """One measured case where the fused flex path beat the per-branch
    kernels: it covers calls on ``device_type`` in ``dtype`` with a head_dim
    in ``head_dims`` and ``min_length <= length <= max_length``."""
    device_type: str
    dtype: torch.dtype
    head_dims: tuple[int, ...]
    min_length: int
    max_length: int
    causal: bool
    training: bool   # gradients flow (forward+backward timed) or not (forward timed)


# The cases where "auto" takes "flex", from tools/bench_attention.py's
# "choice_table" (candidates fast and flex interleaved in one process): the
# adjacent measured lengths of one (device type, dtype, head_dim, causal,
# training) whose winner is "flex" make one row, from the first length to the
# last. Empty until a GPU run measures them, so "auto" is "fast" everywhere
# today. On the CPU "flex" is never chosen: FlexAttention compiles no CPU
# backward, its CPU forward compiles a static graph per length (a checking
# path), and there it measured 0.16x as fast as "fast" at 16K and 32K
# (tools/results/fused_cpu.json).
FLEX_FASTER: tuple[FlexFaster, ...] = ()


def choose_implementation(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, dropout_p: float,
                          table: Sequence[FlexFaster] = FLEX_FASTER) -> str:
    """"flex" where ``table`` measured it faster for this (device, dtype,
    head_dim, length, causal, training) and flex serves the call (prefill, no
    dropout), else "fast"."""
    if not table or q.device.type == "cpu" or dropout_p > 0 or torch.compiler.is_exporting() or not _flex_serves(q, k):
        return "fast"
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    n, d = q.shape[1], q.shape[-1]
    for case in table:
        if (case.device_type == q.device.type and case.dtype == q.dtype and d in case.head_dims
                and case.causal == is_causal and case.training == training
                and case.min_length <= n <= case.max_length):
            return "flex"
    return "fast"


def run_implementation(name: str, q: Tensor, k: Tensor, v: Tensor, flat_plan: Sequence[int], is_causal: bool,
                       scale: float, key_padding_mask: Optional[Tensor], dropout_p: float,
                       ordered: bool = False, softcap: Optional[float] = None,
                       sinks: Optional[Tensor] = None) -> Tensor:
    """Implementation ``name`` (or "auto"'s choice) on checked inputs; the
    reference where it needs dropout it lacks, "fast" where it needs a
    soft-cap or sinks it lacks. ``ordered``: inputs and output in residue
    order (the caller checked ``q_len == kv_len``)."""
    if name == "auto":
        name = choose_implementation(q, k, v, is_causal, dropout_p)
    if (softcap is not None or sinks is not None) and not IMPLEMENTATIONS[name].softcap_sinks:
        name = "fast"
    implementation = IMPLEMENTATIONS[name]
    if v.shape[-1] != q.shape[-1] and not implementation.value_head_dim:
        raise ValueError(f"implementation {name!r} needs v's head_dim equal to q's ({q.shape[-1]}); got {v.shape[-1]}")
    if dropout_p > 0 and not implementation.dropout:
        name, implementation = "reference", IMPLEMENTATIONS["reference"]
    if not ordered:
        return implementation.forward(q, k, v, flat_plan, is_causal, scale, key_padding_mask, dropout_p, softcap, sinks)
    if name == "flex" and _flex_serves(q, k):
        return _flex_forward(q, k, v, flat_plan, is_causal, scale, key_padding_mask, dropout_p, ordered=True)
    # The others work in natural order: one gather of each input, one of the output.
    modulus = residue_modulus(g.rate for g in DilatedPlan.from_flat(q.shape[2], flat_plan).groups)
    q, k, v = (from_residue_order(x, modulus) for x in (q, k, v))
    if key_padding_mask is not None:
        key_padding_mask = from_residue_order(key_padding_mask, modulus)
    out = implementation.forward(q, k, v, flat_plan, is_causal, scale, key_padding_mask, dropout_p, softcap, sinks)
    return to_residue_order(out, modulus)

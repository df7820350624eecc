"""LongNet dilated attention modules (docs/design.md sections 2.1, 5 and 7).

``DilatedAttention(segment_lengths, dilation_rates, *, implementation=
"reference", scheme=, softmax_scale=, dropout=, store=)`` is the one module;
``implementation`` names an entry of ``dilated_implementations.IMPLEMENTATIONS``
("reference": plain, autograd-native, the one to read; "fast": fused kernels,
memory-bounded; "flex": one FlexAttention call over the residue order) or
"auto" (the measured choice between "fast" and "flex"); ``ordered=True``
takes and returns sequences in residue order. ``ImprovedDilatedAttention``
is a preset: the same module with ``implementation="fast"``.

Layout: ``q`` is ``(batch, q_len, heads, head_dim)``, ``k`` ``(batch,
kv_len, kv_heads, head_dim)`` and ``v`` ``(batch, kv_len, kv_heads,
v_head_dim)`` with ``q_len <= kv_len`` and ``heads % kv_heads == 0``
(grouped-query attention: query head ``j`` reads key/value head ``j //
(heads / kv_heads)``); the output is ``(batch, q_len, heads, v_head_dim)``;
``key_padding_mask`` is ``(batch, kv_len)`` bool, True = padding. The
queries are the LAST ``q_len`` positions (bottom-right aligned), so a decode
step or a chunk of prefill gets exactly those rows of the full forward.

The math in two lines. Branch i attends inside segments of ``s = min(w_i, n)``
positions (n = kv_len), each head group to every ``r_i``-th position from its
offset, giving ``O_i`` and ``lse_i`` (0 and -inf where it selects nothing);
the result is ``O = sum_i exp(lse_i - L) O_i`` with ``L = logsumexp_i lse_i``:
one softmax per row over all the keys any branch gives it. With causal
attention a position's pattern never depends on n.

Packed documents: ``forward(..., cu_seqlens=)`` (``attention.packed``;
batch 1, ``q_len == kv_len``) gives every document exactly what it gets as
a sequence of its own (``attention.dilated.packed``): "reference" runs per document,
"fast" and "auto" the bucketed fast path, "flex" one FlexAttention call
over the documents' residue layouts where it serves the call
(``attention.dilated.packed_flex``), else the bucketed path; ``softcap``
and ``sinks`` as without it ("flex" hands them to the bucketed path);
``ordered=True`` refuses it.

Where the rest lives: the plan and its geometry (``attention.dilated.plan``), the
reference (``attention.dilated.reference``), the fast path's kernel walk
(``attention.dilated.fast``), the custom ops and autograd (``attention.dilated.ops``).

Supported program transforms: ``torch.compile`` (``fullgraph=True``,
``dynamic=True``), ``torch.export`` with a dynamic sequence dimension,
``torch.func`` (``grad``, ``vjp``, ``vmap``, ``vmap(grad)``, ``jacrev``).
Double backward works on the reference in eager mode and raises a clear error
on the fast path; ``torch.jit.script`` raises a clear error.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor, nn

from patternstore.fields import check_branches, check_choice
from patternstore.specs import DilatedSpec, SCHEMES
from patternstore.store import PatternStore, default_store

from attention.caches import BoundedCache
from attention.dilated.implementations import IMPLEMENTATION_NAMES, run_implementation
from attention.dilated.fast import backward_groups, forward_groups
from attention.dilated.ops import dilated_attention
from attention.dilated.plan import DilatedPlan
from patternstore.dilated_groups import Group
from attention.dilated.reference import dilated_attention_reference
from attention.checks import check_attention_inputs, check_dropout, check_is_causal, check_softmax_scale, default_scale
from attention.residue import residue_modulus
from attention.checks import check_sinks, check_softcap
from attention.dilated.packed import run_packed
from attention.packed import check_cu_seqlens

__all__ = ["DilatedAttention", "ImprovedDilatedAttention"]

# Plans a module keeps (one per head count it has seen; a model uses one).
_PLANS_KEPT = 8


class DilatedAttention(nn.Module):
    """LongNet dilated attention.

    ``forward(q, k, v, is_causal=False, key_padding_mask=None, *,
    cu_seqlens=None)``: shapes in the module docstring, any length;
    ``cu_seqlens`` packed documents (module docstring). ``implementation``: "reference"
    (default), "fast", "flex" or "auto" (``attention.dilated.implementations``); with
    dropout in training an implementation without dropout of its own runs
    the reference. ``softcap`` (None or c > 0) caps the scaled scores, ``c *
    tanh(s / c)``; ``forward(..., sinks=)`` takes one sink logit per query
    head, ``(heads,)``, that joins each row's softmax denominator only
    (``attention.kernels.sinks``; gradients flow to it); "flex" runs either as
    "fast". ``ordered=True``: q, k, v, ``key_padding_mask`` and the
    output are in residue order (``attention.residue.to_residue_order`` with
    ``self.residue_modulus``), ``q_len == kv_len``; "flex" then runs without
    gathers, the others gather to natural order and back. Pickled state: the
    configuration and ``store`` (a PatternStore, which pickles as its
    directory, or None for the default store); plans are rebuilt lazily in
    any process."""

    def __init__(
        self,
        segment_lengths,
        dilation_rates,
        *,
        implementation: str = "reference",
        scheme: str = "longnet",
        softmax_scale: Optional[float] = None,
        dropout: float = 0.0,
        store: Optional[PatternStore] = None,
        ordered: bool = False,
        softcap: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.segment_lengths, self.dilation_rates = check_branches(segment_lengths, dilation_rates)
        self.implementation = check_choice("implementation", implementation, IMPLEMENTATION_NAMES)
        if not isinstance(ordered, bool):
            raise ValueError(f"ordered must be True or False, got {ordered!r}")
        self.ordered = ordered
        self.scheme = check_choice("scheme", scheme, SCHEMES)
        if store is not None and not isinstance(store, PatternStore):
            raise ValueError(f"store must be a PatternStore or None, got {type(store).__name__}")
        self.softmax_scale = check_softmax_scale(softmax_scale)
        self.dropout = check_dropout(dropout)
        self.softcap = check_softcap(softcap)
        self.store = store
        self._plans: BoundedCache[DilatedPlan] = BoundedCache(_PLANS_KEPT)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_plans": BoundedCache(_PLANS_KEPT)}

    @property
    def residue_modulus(self) -> int:
        """R, the lcm of the rates: ordered mode's order is ``attention.residue.residue_order(n, R)``."""
        return residue_modulus(self.dilation_rates)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script (its kernels are custom ops "
            f"and Python control flow); use torch.compile(module) instead"
        )

    # Compile contract (docs/design.md section 4). The lookup runs in
    # eager Python even inside torch.compile(fullgraph=True): dynamo calls a
    # function marked assume_constant_result at trace time and bakes its
    # result (a few dozen ints) into the graph. The plan depends only on the
    # head count, never on the length (the custom ops derive everything
    # per-length from their inputs' shapes), so a dynamic sequence dimension
    # stays dynamic: one compile serves every length, and torch.export takes
    # a Dim on it. No tensor reaches the graph from the store: there are no
    # graph constants, no device copies and no locks in the graph.
    # The constant is a tuple of ints, not the DilatedPlan: torch 2.11's
    # dynamo could not iterate the NamedTuples of a constant result
    # (InternalTorchDynamoError from a HASATTR guard).
    @torch.compiler.assume_constant_result
    def _flat_plan(self, num_heads: int) -> tuple[int, ...]:
        """``plan(num_heads).flat``: the ints the custom ops take."""
        return self.plan(num_heads).flat

    def plan(self, num_heads: int) -> DilatedPlan:
        """The length-free plan for ``num_heads`` query heads: from this
        module's cache, else its store (a lookup that may take a lock and
        read the disk: call it before tracing, never inside a hot loop)."""
        plan = self._plans.get(num_heads)
        if plan is None:
            spec = DilatedSpec(self.segment_lengths, self.dilation_rates, num_heads, self.scheme)
            store = self.store if self.store is not None else default_store()
            plan = self._plans.put(num_heads, DilatedPlan.from_pattern(store.get(spec)))
        return plan

    def _prepare(self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool,
                key_padding_mask: Optional[Tensor]) -> tuple[tuple[int, ...], float]:
        """(the flat plan for q's head count, the softmax scale), after the checks."""
        check_attention_inputs(q, k, v, key_padding_mask)
        check_is_causal(is_causal)
        if self.ordered and q.shape[1] != k.shape[1]:
            raise ValueError(f"ordered=True takes a whole sequence in residue order (q_len == kv_len); got q_len "
                             f"{q.shape[1]} and kv_len {k.shape[1]}: decode steps and chunked prefill take "
                             f"natural order (a module with ordered=False)")
        flat_plan = self._flat_plan(operator.index(q.shape[2]))
        return flat_plan, default_scale(q, self.softmax_scale)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False, key_padding_mask: Optional[Tensor] = None,
        sinks: Optional[Tensor] = None,
        *, cu_seqlens: Optional[Tensor] = None,
    ) -> Tensor:
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, q, k)
            if self.ordered:
                raise ValueError("cu_seqlens is not supported with ordered=True (the residue order is one "
                                 "sequence's; packed documents take natural order: a module with ordered=False)")
        flat_plan, scale = self._prepare(q, k, v, is_causal, key_padding_mask)
        sinks = check_sinks(sinks, q)
        dropout_p = self.dropout if self.training else 0.0
        if cu_seqlens is not None:
            return run_packed(self.implementation, q, k, v, flat_plan, is_causal, scale, key_padding_mask,
                              dropout_p, cu_seqlens, self.softcap, sinks)
        return run_implementation(self.implementation, q, k, v, flat_plan, is_causal, scale, key_padding_mask,
                                  dropout_p, self.ordered, self.softcap, sinks)

    def extra_repr(self) -> str:
        text = (
            f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
            f"scheme={self.scheme!r}, softmax_scale={self.softmax_scale}, dropout={self.dropout}"
        )
        if self.softcap is not None:
            text += f", softcap={self.softcap}"
        if type(self) is DilatedAttention and self.implementation != "reference":
            text += f", implementation={self.implementation!r}"
        if self.ordered:
            text += ", ordered=True"
        return text


class ImprovedDilatedAttention(DilatedAttention):
    """Preset: ``DilatedAttention(..., implementation="fast")``, the same
    function fast and memory-bounded; a decode step (``q_len`` 1 against a
    cache) costs the keys its row attends. With dropout in training it runs
    the reference (the fused kernels here run without dropout)."""

    def __init__(self, segment_lengths, dilation_rates, **options) -> None:
        super().__init__(segment_lengths, dilation_rates, implementation="fast", **options)

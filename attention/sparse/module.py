"""Block-sparse attention over a stored CSR layout (docs/design.md section 2):
``BlockSparseAttention`` and its path choice.

Layout of every tensor, stated once: ``q`` and the output are ``(batch,
q_len, heads, head_dim)`` (the output's last dimension is v's), ``k`` is
``(batch, kv_len, kv_heads, head_dim)``, ``v`` ``(batch, kv_len, kv_heads,
v_dim)`` (``v_dim`` may differ: multi-head latent attention), with ``kv_len
>= q_len`` and ``heads % kv_heads == 0`` (grouped query attention: query
head ``j`` reads key/value head ``j // (heads / kv_heads)``). The layout is
``kv_num_blocks`` int32 ``[H, nb]`` and ``kv_indices`` int32 ``[nnz]``
(``patternstore.csr``) over ``nb = ceil(kv_len / block_size)`` query and key
blocks, ``H = 1`` (one layout for every head) or ``H = heads``.

Semantics: query row ``r`` sits at position ``p = kv_len - q_len + r``
(bottom-right aligned, docs/design.md section 7; ``q_len == kv_len`` is the
ordinary square case). It attends the set ``K(p)`` of key positions that lie
in the active key blocks of query block ``p // block_size``, are ``<
kv_len``, are ``<= p`` when ``causal``, and are not marked in
``key_padding_mask``, with ONE softmax over all of ``K(p)``::

    out_p = sum_{t in K(p)} exp(s_pt - lse_p) v_t,   s_pt = scale * q_p . k_t,
    lse_p = log sum_{t in K(p)} exp(s_pt).

So the rows of a short ``q`` equal, exactly, the same rows of the full
forward. A query with an empty ``K(p)`` outputs 0 and gets zero gradient.
Gradients are exact (FlashAttention-2's backward from the saved ``lse``).
Masked keys are filled out of the scores and padded keys' k and v rows
zeroed: a NaN or inf in a padded key or value never leaks.

Paths (``attention_path``): "gather", the tiles of attention/sparse/tiles.py
(CPU tensors; decode, chunked prefill and dropout on any device; the
functional ``block_sparse_attention``), and "flex", compiled
``flex_attention`` on a ``BlockMask`` kept per layout, length and device
(attention/block_mask.py), for square CUDA calls.

Where the layout comes from (attention/sparse/layouts.py): eager, a Python
lookup at the top of ``forward``, before any tensor work, so a length the
layout cannot serve (a global block beyond the block count, ...) raises a
ValueError naming the field before any operator runs; under
``torch.compile``/``torch.export`` with a concrete length, a trace-time
constant (no lock, store lookup or module construction in the graph; the
same ValueError at trace time); with a symbolic length (``dynamic=True``,
an export ``Dim``), the lookup operator ``attention::sparse_layout`` at run
time, where that ValueError surfaces from inside the operator. An export
with a ``Dim`` on the length takes any ``min >= 2`` (dynamo specializes
sizes 0 and 1), shorter than a block included: the lookup's block count is
an unbacked size, not ``ceil(n / block_size)``, so no guard ties it to n.

Pickling: a module's state is its layout description and its store's
directory; lookups are rebuilt lazily in whatever process runs it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import has_static_value

from patternstore.fields import as_int
from patternstore.specs import SparseSpec, sparse_template
from patternstore.store import PatternStore

from attention.block_mask import block_mask_of, with_key_padding
from attention.kernels.flex import FLEX_MIN_BLOCK, compiled_flex, flex_tiles
from attention.checks import check_attention_inputs, check_dropout, check_is_causal, check_softmax_scale, default_scale
from attention.sparse.layouts import LayoutPlan, LayoutSource, baked_block_mask, baked_plan, describe_layouts, source, unflatten_plan
from attention.sparse.ops import block_mask_op, layout_op, sparse_attention
from attention.checks import check_sinks, check_softcap
from attention.packed import check_cu_seqlens
from attention.sparse.packed import packed_flex_attention, packed_sparse_attention

__all__ = ["BlockSparseAttention", "attention_path", "FLEX_DEVICE_TYPES"]

# Which path a call takes, decided by ``attention_path``:
# - "flex": compiled ``flex_attention`` on a ``BlockMask`` built once per
#   (layout, length, device) from the stored CSR (flex.block_mask_from_csr),
#   for device types in FLEX_DEVICE_TYPES, square calls (q_len == kv_len), no
#   dropout and blocks that are multiples of FLEX_MIN_BLOCK (torch 2.13's CPU
#   flex returns NaN for 8-token blocks; 16 is exact; the kernel's tiles,
#   ``flex.flex_tiles``, must divide the blocks). On CUDA it is the fused
#   kernel that skips empty blocks and takes GQA natively, with its own backward.
# - "gather": the tiles, for everything else: CPU tensors (flex on the CPU has
#   no backward, refuses lse, and compiles per length: 0.2 s to 2.6 s per
#   (layout, length) measured by tools/bench_sparse.py, and past dynamo's
#   recompile limit it fell back to dense math, a 32 GiB allocation at 32K),
#   decode and chunked prefill (q_len < kv_len: rows not aligned to blocks),
#   and dropout (flex has no dropout).
# Tests add "cpu" to FLEX_DEVICE_TYPES to run the flex path in CPU inference.
FLEX_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


def attention_path(device_type: str, q_len: int, kv_len: int, dropout_p: float, block_size: int,
                   softcap_or_sinks: bool = False) -> str:
    """"flex" or "gather" (see the note above FLEX_DEVICE_TYPES; a soft-cap or
    sinks take "gather", whose kernels compute them)."""
    if (device_type in FLEX_DEVICE_TYPES and q_len == kv_len and dropout_p == 0 and block_size % FLEX_MIN_BLOCK == 0
            and not softcap_or_sinks):
        return "flex"
    return "gather"


def _symbolic(*sizes: Any) -> bool:
    """Whether a size has no value at trace time (``has_static_value`` is
    the test dynamo and export both answer; ``isinstance(n, SymInt)`` is
    False under dynamo)."""
    return not all(has_static_value(s) for s in sizes)


class BlockSparseAttention(nn.Module):
    """Block-sparse attention whose layout comes from the pattern store.

    ``kind`` and ``**params`` are those of ``patternstore.SparseSpec``
    (DeepSpeed's names); the layout for ``(kind, length, block_size, heads,
    seed, params)`` is fetched from ``store`` (``None``: ``default_store()``)
    on the first call at each key length. ``forward(q, k, v, is_causal=False,
    key_padding_mask=None, *, cu_seqlens=None)`` with q ``(batch, q_len, heads, head_dim)`` and k,
    v ``(batch, kv_len, kv_heads, head_dim)``: the query rows are the last
    ``q_len`` positions (a decode step, a chunk of a prefill). The causal rule
    applies when the layout is unidirectional or ``is_causal``; then a
    prefix-stable layout is taken from the layout of ``max_seq_len`` (or of
    the next power of two of the block count). ``dropout`` applies to
    attention probabilities in training. ``softcap`` (None or c > 0) caps
    the scaled scores, ``c * tanh(s / c)``; ``forward(..., sinks=)`` takes
    one sink logit per query head ``(heads,)``, joining each row's softmax
    denominator only (``attention.kernels.sinks``); both run on the gather path.
    attention probabilities in training. ``cu_seqlens`` (1-D integer
    ``[0, end_1, ..., total]``, batch 1, ``q_len == kv_len``): packed
    documents, each attended exactly as alone (attention/sparse/packed.py);
    decode after a packed prefill runs per document, as ordinary sequences.

    Pickles, deep-copies and exports as its layout description and store
    directory: it finds its layouts again in any process.
    """

    def __init__(
        self,
        kind: str,
        *,
        block_size: int = 128,
        seed: int = 0,
        softmax_scale: float | None = None,
        dropout: float = 0.0,
        store: Optional[PatternStore] = None,
        max_seq_len: Optional[int] = None,
        softcap: Optional[float] = None,
        **params: Any,
    ) -> None:
        super().__init__()
        if "num_heads" in params or "seq_len" in params:
            raise ValueError("num_heads and seq_len come from the input (batch, seq_len, heads, head_dim); "
                             "do not pass them")
        dropout = check_dropout(dropout)
        softmax_scale = check_softmax_scale(softmax_scale)
        self.softcap = check_softcap(softcap)
        if store is not None and not isinstance(store, PatternStore):
            raise ValueError(f"store must be a PatternStore or None, got {type(store).__name__}")
        if max_seq_len is not None:
            if as_int(max_seq_len) is None or as_int(max_seq_len) < 1:
                raise ValueError(f"max_seq_len must be an int >= 1 or None, got {max_seq_len!r}")
            max_seq_len = as_int(max_seq_len)
        # Kind and params validated now by every rule that holds at any length;
        # the length's own rule (num_random_blocks <= the blocks of a row)
        # raises at the first call with that length.
        block_size, seed, self.params = sparse_template(kind, block_size, seed, **params)
        self.kind, self.block_size, self.seed = kind, block_size, seed
        self.softmax_scale, self.dropout = softmax_scale, float(dropout)
        self.max_seq_len = max_seq_len
        self._description = describe_layouts(kind, block_size, seed, self.params, store, max_seq_len)
        self._source: Optional[LayoutSource] = source(self._description, store)
        # Read by forward as plain attributes: a compiled forward never builds a source.
        self._unidirectional, self._prefix_stable = self._source.unidirectional, self._source.prefix_stable

    @property
    def layouts(self) -> LayoutSource:
        """This process's lookup of the module's layouts (rebuilt after unpickling)."""
        if self._source is None:
            self._source = source(self._description)
        return self._source

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script (its kernels are custom ops "
            f"and Python control flow); use torch.compile(module) or torch.export instead"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_source"] = None  # process-local: rebuilt from _description where it is unpickled
        return state

    def forward(self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False,
                key_padding_mask: Optional[Tensor] = None, sinks: Optional[Tensor] = None, *,
                cu_seqlens: Optional[Tensor] = None) -> Tensor:
        check_attention_inputs(q, k, v, key_padding_mask)  # before the lookup: bad input costs no work
        sinks = check_sinks(sinks, q)
        if cu_seqlens is not None:
            cu_seqlens = check_cu_seqlens(cu_seqlens, q, k)
            causal = check_is_causal(is_causal) or self._unidirectional
            return self._packed_forward(q, k, v, causal, key_padding_mask, cu_seqlens, sinks)
        causal = self.causal(check_is_causal(is_causal), q.shape[1], k.shape[1])
        q_len, kv_len, heads = q.shape[1], k.shape[1], q.shape[2]
        dropout_p = self.dropout if self.training else 0.0
        softcap = self.softcap
        if attention_path(q.device.type, q_len, kv_len, dropout_p, self.block_size,
                          softcap is not None or sinks is not None) == "flex":
            return self._flex_forward(q, k, v, causal, key_padding_mask)
        plan = self._plan(q, k, causal)
        return sparse_attention(q, k, v, plan.kv_num_blocks, plan.kv_indices, plan.groups, self.block_size, causal,
                                default_scale(q, self.softmax_scale), dropout_p, key_padding_mask, trusted_layout=True,
                                softcap=softcap, sinks=sinks)

    def causal(self, is_causal: bool, q_len: int, kv_len: int) -> bool:
        """Whether a call applies the causal rule (``is_causal`` or a
        unidirectional layout); ValueError for causal rows of a decode step
        whose layout is not prefix-stable."""
        causal = is_causal or self._unidirectional
        if causal and q_len != kv_len and not self._prefix_stable:
            raise ValueError(
                f"causal attention with fewer queries than keys (q_len={q_len}, kv_len={kv_len}: a "
                f"decode step) needs a prefix-stable layout, whose rows do not depend on the length; "
                f"{self.kind!r} with {self.params} is not (attention='unidirectional' layouts are)"
            )
        return causal

    def _plan(self, q: Tensor, k: Tensor, causal: bool) -> LayoutPlan:
        """The layout and row groups of this call (module docstring: eager
        lookup, trace-time constant, or the lookup operator)."""
        q_len, kv_len, heads = q.shape[1], k.shape[1], q.shape[2]
        if _symbolic(q_len, kv_len, heads):
            # Detached: the lookup reads shapes only; an input that requires
            # grad would put the operator under autograd for nothing.
            return LayoutPlan(*layout_op(q.detach(), k.detach(), self._description, causal), [])
        first_block = (kv_len - q_len) // self.block_size
        if torch.compiler.is_compiling():
            return unflatten_plan(baked_plan(self._description, kv_len, heads, str(q.device), causal, first_block))
        return self.layouts.plan(kv_len, heads, q.device, causal, first_block)

    def _packed_forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, key_padding_mask: Optional[Tensor],
                        cu_seqlens: Tensor, sinks: Optional[Tensor]) -> Tensor:
        """Packed documents (attention/sparse/packed.py): eager flex calls
        take the flex path, every other call (a soft-cap or sinks among
        them, as unpacked) the packed tile operator."""
        dropout_p = self.dropout if self.training else 0.0
        scale = default_scale(q, self.softmax_scale)
        n, softcap = q.shape[1], self.softcap
        if (attention_path(q.device.type, n, n, dropout_p, self.block_size,
                           softcap is not None or sinks is not None) == "flex"
                and not torch.compiler.is_compiling()):
            return packed_flex_attention(q, k, v, cu_seqlens, key_padding_mask, description=self._description,
                                         block_size=self.block_size, causal=causal, scale=scale)
        return packed_sparse_attention(q, k, v, cu_seqlens, key_padding_mask, description=self._description,
                                       block_size=self.block_size, causal=causal, scale=scale, dropout_p=dropout_p,
                                       softcap=softcap, sinks=sinks)

    def _flex_forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool,
                      key_padding_mask: Optional[Tensor]) -> Tensor:
        """The flex path (note above FLEX_DEVICE_TYPES): eager, the kept
        BlockMask itself; compiled, its arrays as trace-time constants (or
        through ``attention::sparse_block_mask`` at a symbolic length)."""
        n, heads = k.shape[1], q.shape[2]
        padded = key_padding_mask is not None
        if _symbolic(n, heads):
            arrays = block_mask_op(q.detach(), k.detach(), self._description, causal, padded)
            mask = block_mask_of(arrays, n, self.block_size, causal)
        elif torch.compiler.is_compiling():
            arrays = baked_block_mask(self._description, n, heads, str(q.device), causal, padded)
            mask = block_mask_of(list(arrays), n, self.block_size, causal)
        else:
            mask = self.layouts.block_mask(n, heads, q.device, causal, padded)
        if padded:
            mask = with_key_padding(mask, key_padding_mask)
            # A padded key's NaN or Inf VALUE would meet its 0 probability in p @ v (0 * NaN): zeroed.
            rows = key_padding_mask[:, :, None, None]
            k, v = k.masked_fill(rows, 0.0), v.masked_fill(rows, 0.0)
        out = compiled_flex(q.device.type)(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
            scale=default_scale(q, self.softmax_scale), enable_gqa=heads != k.shape[2],
            kernel_options=flex_tiles(self.block_size) or None,
        )
        return out.transpose(1, 2)

    def spec(self, seq_len: int, num_heads: int) -> SparseSpec:
        """The spec of the layout at that length (without capacity), e.g. for
        ``attention.block_mask.to_block_mask(store.get(module.spec(n, h)))``."""
        return self.layouts.spec(seq_len, num_heads)

    def extra_repr(self) -> str:
        text = f"kind={self.kind!r}, block_size={self.block_size}, seed={self.seed}, params={self.params}"
        return text if self.softcap is None else f"{text}, softcap={self.softcap}"

"""Multi-head attention: projections around an attention module.

``MultiheadWrapper`` is the layer every multi-head class here is: q/k/v
projections (three, or one fused ``in_proj`` with ``fused_qkv=True``), the
attention module on (batch, seq, heads, head_dim), an optional LayerNorm and
the output projection. ``MultiheadDilatedAttention`` puts
``DilatedAttention(implementation=...)`` inside; ``ImprovedMultiheadDilatedAttention``
is its preset ``implementation="fast", fused_qkv=True``;
``MultiheadBlockSparseAttention`` puts ``BlockSparseAttention`` inside and
``DistributedMultiheadDilatedAttention`` the sequence-parallel
``DistributedDilatedAttention``.

Batch first: ``query`` is (batch, q_len, embed_dim) and ``key, value``
(batch, kv_len, embed_dim) with ``q_len <= kv_len``: the queries are the last
``q_len`` positions (a decode step, a chunk of a prefill), as at every module
entry point; key and value default to query (self-attention). Following
MAGNETO (arXiv 2210.06423), a LayerNorm sits before the output projection
(``layer_norm=True``), and the value and output projections start
Xavier-normal with gain ``gamma_init`` (query and key with gain 1). The fused
projection is one matmul for self-attention and its three row blocks for
distinct key or value; its state_dict key is ``in_proj`` (``q_proj``,
``k_proj``, ``v_proj`` unfused).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from patternstore.store import PatternStore

from attention.checks import check_count
from attention.dilated.distributed import DistributedDilatedAttention
from attention.dilated.module import DilatedAttention
from attention.sparse.module import BlockSparseAttention

__all__ = [
    "MultiheadWrapper",
    "MultiheadDilatedAttention",
    "ImprovedMultiheadDilatedAttention",
    "MultiheadBlockSparseAttention",
    "DistributedMultiheadDilatedAttention",
]


class MultiheadWrapper(nn.Module):
    """Projections around ``attention``, a module called as
    ``attention(q, k, v, is_causal=, key_padding_mask=)`` on (batch, seq,
    num_heads, head_dim) that returns the same shape.

    ``forward(query, key=None, value=None, *, key_padding_mask=None,
    need_weights=False, is_causal=False, cu_seqlens=None) -> (out, None)``;
    ``out`` is (batch, seq, embed_dim). ``key_padding_mask`` (batch, seq)
    bool, True = padding: those keys enter no softmax, and a query with no
    unpadded key gets attention output 0 (never NaN). ``cu_seqlens``: packed
    documents (``attention.packed``), passed to ``attention``; the
    projections are per position, so each document gets what it gets alone. Attention weights are never materialized,
    so ``need_weights=True`` is an error."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        attention: nn.Module,
        *,
        fused_qkv: bool = False,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        embed_dim, num_heads = check_count("embed_dim", embed_dim), check_count("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.gamma_init = float(gamma_init)
        factory = {"device": device, "dtype": dtype}
        if not isinstance(fused_qkv, bool):
            raise ValueError(f"fused_qkv must be a bool, got {fused_qkv!r}")
        self.fused_qkv = fused_qkv
        self.attention = attention
        if fused_qkv:
            self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **factory)
        else:
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
            self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
            self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory) if layer_norm else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def input_projections(self) -> list[tuple[Tensor, Optional[Tensor], float]]:
        """(weight, bias, initial gain) of the q, k and v projections (row
        blocks of ``in_proj`` when fused)."""
        gains = (1.0, 1.0, self.gamma_init)
        if not self.fused_qkv:
            return [(p.weight, p.bias, gain) for p, gain in zip((self.q_proj, self.k_proj, self.v_proj), gains)]
        e, bias = self.embed_dim, self.in_proj.bias
        return [
            (self.in_proj.weight[i * e : (i + 1) * e], None if bias is None else bias[i * e : (i + 1) * e], gain)
            for i, gain in enumerate(gains)
        ]

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not self.fused_qkv:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if key is query and value is query:
            return self.in_proj(query).chunk(3, dim=-1)
        return tuple(F.linear(x, w, b) for x, (w, b, _) in zip((query, key, value), self.input_projections()))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for weight, bias, gain in self.input_projections() + [(self.out_proj.weight, self.out_proj.bias, self.gamma_init)]:
                nn.init.xavier_normal_(weight, gain=gain)
                if bias is not None:
                    bias.zero_()
        if self.norm is not None:
            self.norm.reset_parameters()

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        *,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = False,
        is_causal: bool = False,
        cu_seqlens: Optional[Tensor] = None,
    ) -> tuple[Tensor, None]:
        if need_weights:
            raise ValueError(
                f"need_weights=True is not supported: {type(self.attention).__name__} never "
                "materializes the attention weights; call with need_weights=False"
            )
        key = query if key is None else key
        value = key if value is None else value
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{name} must have shape (batch, seq, embed_dim={self.embed_dim}), got {shape}")
        if key.shape != value.shape or query.shape[0] != key.shape[0] or query.shape[1] > key.shape[1]:
            raise ValueError(
                f"key and value must have one shape (batch, kv_len, embed_dim) and query (batch, q_len, "
                f"embed_dim) with q_len <= kv_len (the last positions); got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        q, k, v = (x.unflatten(-1, (self.num_heads, self.head_dim)) for x in self._project(query, key, value))
        # Passed only when given: packed documents are the attention module's to accept or refuse.
        packed = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        x = self.attention(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, **packed).flatten(-2)
        if self.norm is not None:
            x = self.norm(x)
        return self.out_proj(x), None


class MultiheadDilatedAttention(MultiheadWrapper):
    """``MultiheadWrapper`` around ``DilatedAttention(segment_lengths,
    dilation_rates, implementation=, scheme=, dropout=, store=, ordered=)``;
    ``fused_qkv`` and the other projection options as ``MultiheadWrapper``'s.
    The projections are per position, so with ``ordered=True`` the layer takes
    and returns ``(batch, n, embed_dim)`` in residue order too."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths,
        dilation_rates,
        *,
        implementation: str = "reference",
        dropout: float = 0.0,
        scheme: str = "longnet",
        store: Optional[PatternStore] = None,
        ordered: bool = False,
        **projection_options,
    ) -> None:
        attention = DilatedAttention(segment_lengths, dilation_rates, implementation=implementation, scheme=scheme,
                                     dropout=dropout, store=store, ordered=ordered)
        super().__init__(embed_dim, num_heads, attention, **projection_options)


class ImprovedMultiheadDilatedAttention(MultiheadDilatedAttention):
    """Preset: ``MultiheadDilatedAttention(..., implementation="fast",
    fused_qkv=True)``: the fast kernels and one fused (3 * embed_dim,
    embed_dim) input projection ``in_proj``."""

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths, dilation_rates, **options) -> None:
        super().__init__(embed_dim, num_heads, segment_lengths, dilation_rates, implementation="fast",
                         fused_qkv=True, **options)


class MultiheadBlockSparseAttention(MultiheadWrapper):
    """``forward(query, key=None, value=None, *, key_padding_mask=None,
    need_weights=False, is_causal=False, cu_seqlens=None) -> (out, None)``,
    as every ``MultiheadWrapper`` (``cu_seqlens``: packed documents, each
    attended as alone, as ``BlockSparseAttention`` takes them); ``kind``,
    ``block_size``, ``seed``,
    ``softmax_scale``, ``max_seq_len`` (the capacity of causal layouts) and
    ``**params`` (DeepSpeed's names) choose the layout, as in
    ``BlockSparseAttention``. Which key lengths the wrapper accepts is
    ``MultiheadWrapper``'s rule; the attention itself takes queries shorter
    than keys (bottom-right aligned)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kind: str,
        *,
        block_size: int = 128,
        seed: int = 0,
        softmax_scale: Optional[float] = None,
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        store: Optional[PatternStore] = None,
        max_seq_len: Optional[int] = None,
        device=None,
        dtype=None,
        **params: Any,
    ) -> None:
        attention = BlockSparseAttention(
            kind, block_size=block_size, seed=seed, softmax_scale=softmax_scale, dropout=dropout, store=store,
            max_seq_len=max_seq_len, **params
        )
        super().__init__(
            embed_dim, num_heads, attention, bias=bias, layer_norm=layer_norm, layer_norm_eps=layer_norm_eps,
            gamma_init=gamma_init, device=device, dtype=dtype,
        )


class DistributedMultiheadDilatedAttention(MultiheadWrapper):
    """``MultiheadWrapper`` around ``DistributedDilatedAttention(segment_lengths,
    dilation_rates, process_group=, timeout=, scheme=, dropout=, store=)``:
    ``query, key, value`` are this rank's chunk (batch, seq_len // world_size,
    embed_dim), the output is this rank's chunk. Projections are per position,
    so they run locally; only the attention communicates. Parameters must be
    equal on every rank (as under DistributedDataParallel)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths,
        dilation_rates,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        timeout: timedelta = timedelta(minutes=5),
        dropout: float = 0.0,
        scheme: str = "longnet",
        store=None,
        **projection_options,
    ) -> None:
        attention = DistributedDilatedAttention(segment_lengths, dilation_rates, process_group=process_group,
                                                timeout=timeout, scheme=scheme, dropout=dropout, store=store)
        super().__init__(embed_dim, num_heads, attention, **projection_options)

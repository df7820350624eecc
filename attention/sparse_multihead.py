"""``MultiheadBlockSparseAttention``: the multi-head wrapper of
``attention.multihead`` (batch-first q/k/v/out projections, optional
LayerNorm before the output projection, Xavier-normal initialization) around
``BlockSparseAttention`` instead of dilated attention.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from patternstore.store import PatternStore

from .multihead import MultiheadDilatedAttention
from .sparse import BlockSparseAttention

__all__ = ["MultiheadBlockSparseAttention"]


class MultiheadBlockSparseAttention(MultiheadDilatedAttention):
    """``forward(query, key=None, value=None, *, key_padding_mask=None,
    need_weights=False, is_causal=False) -> (out, None)``, exactly as
    ``MultiheadDilatedAttention``; ``kind``, ``block_size``, ``seed``,
    ``softmax_scale`` and ``**params`` (DeepSpeed's names) choose the layout,
    as in ``BlockSparseAttention``. Key and value have the query's length
    (block layouts are square)."""

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
        device=None,
        dtype=None,
        **params: Any,
    ) -> None:
        # Read by _make_attention, which the base __init__ calls.
        self._layout = dict(kind=kind, block_size=block_size, seed=seed, softmax_scale=softmax_scale, **params)
        super().__init__(
            embed_dim, num_heads, None, None, dropout=dropout, bias=bias, layer_norm=layer_norm,
            layer_norm_eps=layer_norm_eps, gamma_init=gamma_init, store=store, device=device, dtype=dtype,
        )

    def _make_attention(self, segment_lengths, dilation_rates, *, scheme, dropout, store) -> nn.Module:
        return BlockSparseAttention(**self._layout, dropout=dropout, store=store)

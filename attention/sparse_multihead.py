"""``MultiheadBlockSparseAttention``: ``attention.multihead.MultiheadWrapper``
(batch-first q/k/v/out projections, optional LayerNorm before the output
projection, Xavier-normal initialization) around ``BlockSparseAttention``.
"""

from __future__ import annotations

from typing import Any, Optional

from patternstore.store import PatternStore

from .multihead import MultiheadWrapper
from .sparse import BlockSparseAttention

__all__ = ["MultiheadBlockSparseAttention"]


class MultiheadBlockSparseAttention(MultiheadWrapper):
    """``forward(query, key=None, value=None, *, key_padding_mask=None,
    need_weights=False, is_causal=False, cu_seqlens=None) -> (out, None)``,
    as every ``MultiheadWrapper`` (``cu_seqlens``: packed documents, each
    attended as alone, as ``BlockSparseAttention`` takes them); ``kind``, ``block_size``, ``seed``,
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

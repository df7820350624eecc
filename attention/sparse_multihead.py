"""``MultiheadBlockSparseAttention``: q/k/v/out projections around
``BlockSparseAttention``. Batch-first: ``query, key, value`` are ``(batch,
seq, embed_dim)``; heads split ``embed_dim`` into ``num_heads`` slices of
``head_dim = embed_dim // num_heads``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .sparse import BlockSparseAttention

__all__ = ["MultiheadBlockSparseAttention"]


class MultiheadBlockSparseAttention(nn.Module):
    """Multi-head block-sparse self-attention (or attention over a ``key`` /
    ``value`` of the query's length: block layouts are square).

    ``forward(query, key=None, value=None, *, key_padding_mask=None,
    need_weights=False, is_causal=False) -> (out, None)``: ``key`` defaults to
    ``query`` and ``value`` to ``key``; ``key_padding_mask`` bool ``(batch,
    seq)``, True where a key is ignored (``nn.MultiheadAttention``'s
    convention). Attention weights are never materialized, so
    ``need_weights=True`` is refused. ``kind`` and ``**params`` as in
    ``BlockSparseAttention``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kind: str,
        *,
        block_size: int = 128,
        seed: int = 0,
        bias: bool = True,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        store=None,
        device=None,
        dtype=None,
        **params: Any,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.attention = BlockSparseAttention(
            kind, block_size=block_size, seed=seed, softmax_scale=softmax_scale,
            dropout=dropout, store=store, **params,
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        if need_weights:
            raise ValueError("need_weights=True is not supported: block-sparse attention never "
                             "materializes the attention weights")
        key = query if key is None else key
        value = key if value is None else value
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != self.embed_dim:
                raise ValueError(f"{name} must be (batch, seq_len, embed_dim={self.embed_dim}), "
                                 f"got {tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if key.shape[:2] != query.shape[:2] or value.shape[:2] != query.shape[:2]:
            raise ValueError(
                f"key and value must have the query's (batch, seq_len) = {tuple(query.shape[:2])} "
                f"(block layouts are square); got key {tuple(key.shape[:2])}, value {tuple(value.shape[:2])}"
            )
        b, n, _ = query.shape
        heads = (b, n, self.num_heads, self.head_dim)
        out = self.attention(
            self.q_proj(query).view(heads), self.k_proj(key).view(heads), self.v_proj(value).view(heads),
            is_causal, key_padding_mask=key_padding_mask,
        )
        return self.out_proj(out.reshape(b, n, self.embed_dim)), None

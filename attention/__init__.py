"""attention: dilated and block-sparse attention over patterns from the store."""

from .sparse import BlockSparseAttention, block_sparse_attention
from .sparse_multihead import MultiheadBlockSparseAttention

__all__ = ["BlockSparseAttention", "MultiheadBlockSparseAttention", "block_sparse_attention"]

"""attention: LongNet dilated, block-sparse and sequence-parallel attention over patternstore plans."""

from .sparse import BlockSparseAttention, block_sparse_attention
from .sparse_multihead import MultiheadBlockSparseAttention

__all__ = ["BlockSparseAttention", "MultiheadBlockSparseAttention", "block_sparse_attention"]

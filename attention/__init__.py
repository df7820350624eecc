"""attention: LongNet dilated, block-sparse and sequence-parallel attention over patternstore plans."""

from .dilated import DilatedAttention, ImprovedDilatedAttention
from .dilated_ops import dilated_attention
from .dilated_plan import DilatedPlan
from .dilated_reference import dilated_attention_reference
from .distributed import DistributedDilatedAttention, DistributedMultiheadDilatedAttention
from .multihead import ImprovedMultiheadDilatedAttention, MultiheadDilatedAttention, MultiheadWrapper
from .sparse import BlockSparseAttention
from .sparse_ops import block_sparse_attention
from .sparse_multihead import MultiheadBlockSparseAttention

__all__ = [
    "DilatedAttention",
    "ImprovedDilatedAttention",
    "MultiheadWrapper",
    "MultiheadDilatedAttention",
    "ImprovedMultiheadDilatedAttention",
    "DistributedDilatedAttention",
    "DistributedMultiheadDilatedAttention",
    "BlockSparseAttention",
    "MultiheadBlockSparseAttention",
    "DilatedPlan",
    "dilated_attention",
    "dilated_attention_reference",
    "block_sparse_attention",
]

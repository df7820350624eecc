"""attention: LongNet dilated, block-sparse and sequence-parallel attention over patternstore plans.

The public names, each imported from the module that defines it (the README's
architecture section says where each concept lives).
"""

from attention.block_mask import to_block_mask
from attention.caches import clear_caches
from attention.dilated.distributed import DistributedDilatedAttention
from attention.dilated.module import DilatedAttention, ImprovedDilatedAttention
from attention.dilated.ops import dilated_attention
from attention.dilated.plan import DilatedPlan
from attention.dilated.reference import dilated_attention_reference
from attention.multihead import (
    DistributedMultiheadDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    MultiheadBlockSparseAttention,
    MultiheadDilatedAttention,
    MultiheadWrapper,
)
from attention.residue import from_residue_order, residue_order, to_residue_order
from attention.sparse.module import BlockSparseAttention
from attention.sparse.ops import block_sparse_attention

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
    "to_block_mask",
    "residue_order",
    "to_residue_order",
    "from_residue_order",
    "clear_caches",
]

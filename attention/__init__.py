"""attention: LongNet dilated, block-sparse and sequence-parallel attention over patternstore plans."""

from .dilated import (
    DilatedAttention,
    DilatedPlan,
    ImprovedDilatedAttention,
    dilated_attention,
    dilated_attention_reference,
)
from .distributed import DistributedDilatedAttention, DistributedMultiheadDilatedAttention
from .multihead import ImprovedMultiheadDilatedAttention, MultiheadDilatedAttention

__all__ = [
    "DilatedAttention",
    "ImprovedDilatedAttention",
    "MultiheadDilatedAttention",
    "ImprovedMultiheadDilatedAttention",
    "DistributedDilatedAttention",
    "DistributedMultiheadDilatedAttention",
    "DilatedPlan",
    "dilated_attention",
    "dilated_attention_reference",
]

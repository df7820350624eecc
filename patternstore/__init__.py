"""patternstore: specs, generators and a two-tier store of attention patterns."""

from .generate import generate
from .pattern import Pattern
from .specs import DilatedSpec, SparseSpec, Spec, spec_from_dict
from .store import PatternStore, default_store

__all__ = ["DilatedSpec", "SparseSpec", "Spec", "Pattern", "generate", "spec_from_dict", "PatternStore", "default_store"]

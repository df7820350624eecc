"""attention: LongNet dilated, block-sparse and sequence-parallel attention over patternstore plans."""

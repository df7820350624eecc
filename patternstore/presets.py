"""Named sets of specs that people actually use, for ``patternstore precompute --preset``.

Dilated patterns hold no length (one entry serves every sequence length), so
a dilated preset names branches and head counts only.

- ``default``: a small mix of every family (DeepSpeed layouts at 8K tokens);
  seconds to precompute on two cores (``make run`` seeds it).
- ``longnet``: LongNet's published configuration (arXiv 2307.02486, its
  experimental setup): segment lengths 2048, 4096, 8192, 16384, 32768 with dilation rates
  1, 2, 4, 6, 12, for 8, 12 or 16 heads.
- ``dilated-small``: the smaller set of dilated-attention libraries
  (segments 2048, 4096, 8192 with rates 1, 2, 4), in both schemes: "longnet"
  (every branch on every head) and "grouped" (branch i on head group i, as in
  dilated-attention-pytorch), for 8 or 16 heads.
- ``sparse``: DeepSpeed's sparsity configs with their default parameters,
  block size 128, 8 or 16 heads: bigbird, bslongformer and local at 4K to 1M
  tokens; fixed up to 256K only (its global columns repeat in every local
  window, so its layout grows with the square of the length: 64 MiB at 1M).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .specs import DilatedSpec, SparseSpec, Spec

LONGNET_SEGMENTS = (2048, 4096, 8192, 16384, 32768)
LONGNET_RATES = (1, 2, 4, 6, 12)
SMALL_SEGMENTS = (2048, 4096, 8192)
SMALL_RATES = (1, 2, 4)
SPARSE_KINDS_SHIPPED = ("bigbird", "bslongformer", "fixed", "local")
SPARSE_BLOCK = 128


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    specs: tuple[Spec, ...]


def _dilated(
    heads: Sequence[int], segments: tuple[int, ...], rates: tuple[int, ...],
    schemes: Sequence[str] = ("longnet",),
) -> tuple[Spec, ...]:
    return tuple(DilatedSpec(segments, rates, h, scheme) for scheme in schemes for h in heads)


def _sparse(kinds: Sequence[str], lengths: Sequence[int], heads: Sequence[int]) -> tuple[Spec, ...]:
    return tuple(SparseSpec(kind, n, SPARSE_BLOCK, h) for kind in kinds for n in lengths for h in heads)


_K = 1024
PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "default",
            "small mix for a quick start: LongNet and 2K/4K/8K dilated (any length), DeepSpeed layouts at 8K (8 heads)",
            _dilated((8,), SMALL_SEGMENTS, SMALL_RATES)
            + _dilated((8,), LONGNET_SEGMENTS, LONGNET_RATES)
            + _sparse(SPARSE_KINDS_SHIPPED, (8 * _K,), (8,)),
        ),
        Preset(
            "longnet",
            "LongNet's published branches (2K..32K, rates 1,2,4,6,12), any length, 8/12/16 heads",
            _dilated((8, 12, 16), LONGNET_SEGMENTS, LONGNET_RATES),
        ),
        Preset(
            "dilated-small",
            "segments 2048,4096,8192 with rates 1,2,4, schemes longnet and grouped, any length, 8/16 heads",
            _dilated((8, 16), SMALL_SEGMENTS, SMALL_RATES, ("longnet", "grouped")),
        ),
        Preset(
            "sparse",
            "DeepSpeed-style bigbird, bslongformer, local (4K-1M) and fixed (4K-256K), block 128, 8/16 heads",
            _sparse(("bigbird", "bslongformer", "local"), tuple(n * _K for n in (4, 16, 64, 256, 1024)), (8, 16))
            + _sparse(("fixed",), tuple(n * _K for n in (4, 16, 64, 256)), (8, 16)),
        ),
    )
}

"""The one block-diagonal composer (``attention.block_mask.block_diagonal``)
that the packed sparse plan and the packed fused dilated path both use,
against a dense block-diagonal matrix built by a Python loop over the
documents from each document's dense layout."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention.block_mask import block_diagonal, stack_layouts


def csr_of(dense: torch.Tensor, flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts [H, nb], indices, flags) of a dense (H, nb, nb) layout, rows head-major and ascending."""
    counts, indices, marks = [], [], []
    for h in range(dense.shape[0]):
        row_counts = []
        for i in range(dense.shape[1]):
            columns = [j for j in range(dense.shape[2]) if dense[h, i, j]]
            row_counts.append(len(columns))
            indices += columns
            marks += [bool(flags[h, i, j]) for j in columns]
        counts.append(row_counts)
    return (torch.tensor(counts, dtype=torch.int32).reshape(dense.shape[0], dense.shape[1]),
            torch.tensor(indices, dtype=torch.int32), torch.tensor(marks, dtype=torch.bool))


@st.composite
def documents(draw):
    """Per-document dense layouts taken from a few stored layouts: a
    document of ``nb`` blocks reads the top-left corner of a layout of at
    least ``nb`` blocks (a whole layout when its size is ``nb``)."""
    block = draw(st.integers(1, 5))
    lengths = draw(st.lists(st.integers(0, 4 * block + 1), min_size=1, max_size=8))  # empty, short, ragged
    blocks = [-(-n // block) for n in lengths]
    heads = draw(st.integers(1, 3))
    sizes = [max(blocks) + draw(st.integers(0, 2))] + draw(st.lists(st.integers(1, 6), max_size=3))
    sizes = [max(size, 1) for size in sizes]
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    layouts = [(torch.rand(heads, m, m, generator=g) < density, torch.rand(heads, m, m, generator=g) < 0.5)
               for m in sizes]
    which = [draw(st.sampled_from([u for u, m in enumerate(sizes) if m >= nb])) for nb in blocks]
    return blocks, layouts, which


@settings(max_examples=200, deadline=None)
@given(documents(), st.booleans())
def test_block_diagonal_is_the_dense_block_diagonal_of_the_documents(case, with_flags):
    blocks, layouts, which = case
    csrs = [csr_of(dense, flags) for dense, flags in layouts]
    counts, indices, first = stack_layouts([(c, i) for c, i, _ in csrs])
    heads = counts.shape[0]
    # the stack's flags in its entry order: head h's entries of every layout, then head h + 1's
    flags = torch.cat([f[int(c[:h].sum()):int(c[:h + 1].sum())] for h in range(heads) for c, _, f in csrs])
    got = block_diagonal(counts, indices, first[which], torch.tensor(blocks), flags if with_flags else None)

    total = sum(blocks)
    expected = torch.zeros(heads, total, total, dtype=torch.bool)
    expected_flags = torch.zeros_like(expected)
    offset = 0
    for nb, u in zip(blocks, which):
        dense, marks = layouts[u]
        expected[:, offset:offset + nb, offset:offset + nb] = dense[:, :nb, :nb]
        expected_flags[:, offset:offset + nb, offset:offset + nb] = marks[:, :nb, :nb]
        offset += nb
    want = csr_of(expected, expected_flags)
    assert torch.equal(got[0], want[0]) and got[0].dtype == torch.int32
    assert torch.equal(got[1], want[1]) and got[1].dtype == torch.int32  # rows head-major, each ascending
    assert torch.equal(got[2], want[2]) if with_flags else got[2] is None

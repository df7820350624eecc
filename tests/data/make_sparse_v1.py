"""Writes sparse_v1.pt2 and sparse_v1_io.pt: a torch.export program of
BlockSparseAttention saved by the code at commit c61d590 (its operators
``patternstore::sparse_layout`` and ``patternstore::block_sparse_forward``),
with its float64 inputs and output, so tests/test_sparse.py can check that a
program saved by that version still loads and runs. Run once, from a checkout
of c61d590: ``PYTHONPATH=<checkout> PATTERNSTORE_DIR=<tmp> python make_sparse_v1.py <out folder>``.
"""

import sys

import torch

from attention import BlockSparseAttention

torch.manual_seed(0)
folder = sys.argv[1]
module = BlockSparseAttention("bslongformer", block_size=4, global_block_indices=(1,))  # the default store
q, k, v = (torch.randn(1, 26, 2, 4, dtype=torch.float64) for _ in range(3))
pad = torch.zeros(1, 26, dtype=torch.bool)
pad[:, -3:] = True
sequence = torch.export.Dim("sequence", min=5, max=64)
program = torch.export.export(module, (q, k, v), {"is_causal": True, "key_padding_mask": pad},
                              dynamic_shapes=({1: sequence}, {1: sequence}, {1: sequence}, None, {1: sequence}))
torch.export.save(program, f"{folder}/sparse_v1.pt2")
short = tuple(x[:, :13].clone() for x in (q, k, v))
torch.save({"q": q, "k": k, "v": v, "key_padding_mask": pad, "out": module(q, k, v, is_causal=True, key_padding_mask=pad),
            "q13": short[0], "k13": short[1], "v13": short[2],
            "out13": module(*short, is_causal=True, key_padding_mask=pad[:, :13])}, f"{folder}/sparse_v1_io.pt")

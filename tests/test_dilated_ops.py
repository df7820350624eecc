"""The dilated custom ops: one ``attention::`` namespace, and the
``patternstore::`` names of the previous version kept as aliases, so that
programs exported by it still load and compute.

``tests/data/dilated_v1.pt2`` (``ImprovedDilatedAttention``) and
``tests/data/dilated_reference_v1.pt2`` (``DilatedAttention``) were exported
by commit c61d590 with ``torch.export`` (segments (8, 16), rates (1, 2),
q/k/v (2, 24, 4, 8) float32, causal, the last 5 keys of batch row 1 padded,
the sequence dimension a ``Dim``) and saved with ``torch.export.save``; their
``*_io.pt`` hold the inputs and that version's outputs at lengths 24 and 19,
tensors only (loaded with ``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attention  # noqa: F401  (registers the operators before the programs load)
from dense_reference import dense_dilated_attention

DATA = Path(__file__).parent / "data"
SEGMENTS, RATES = (8, 16), (1, 2)


@pytest.mark.parametrize("name, old_op", [("dilated_v1", "patternstore.dilated_attention"),
                                          ("dilated_reference_v1", "patternstore.dilated_attention_reference")])
def test_programs_exported_by_the_previous_version_load_and_compute(name, old_op):
    io = torch.load(DATA / f"{name}_io.pt", weights_only=True)
    program = torch.export.load(DATA / f"{name}.pt2")
    called = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert f"{old_op}.default" in called  # the program names the old op: the alias is what runs
    module = program.module()
    q, k, v, pad = io["q"], io["k"], io["v"], io["key_padding_mask"]
    for n, expected in ((24, io["out"]), (19, io["out_19"])):
        xs = [x[:, :n] for x in (q, k, v)]
        with torch.no_grad():
            out = module(*xs, is_causal=True, key_padding_mask=pad[:, :n])
        # float32 against that version's float32 output, and both against the float64 definition
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        dense = dense_dilated_attention(*xs, SEGMENTS, RATES, is_causal=True, key_padding_mask=pad[:, :n])
        torch.testing.assert_close(out.double(), dense, rtol=1e-5, atol=1e-5)

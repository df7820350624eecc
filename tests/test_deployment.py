"""Deployment as a user ships a model: ``torch.export`` then AOTInductor
(``torch._inductor.aoti_compile_and_package`` / ``aoti_load_package``) of
every module family, at a static and at a dynamic length, equal to the
exported program (and to the float64 reference); the package loaded in a
fresh process that imports ``attention`` (README: what a process must import
before loading); ``implementation="flex"`` refused up front.

One program holds one module of each operator family (dilated reference,
dilated fast, block-sparse through a multi-head layer), so a whole case is
one AOTInductor compile (30-60 s on a 2-core CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from attention import BlockSparseAttention, DilatedAttention, MultiheadBlockSparseAttention
from attention.dense_reference import block_pairs, dense_attention, dense_dilated_attention
from patternstore import PatternStore, generate

pytestmark = pytest.mark.usefixtures("one_thread")


class Families(nn.Module):
    """One module of each operator family, on the same q, k, v (and the
    multi-head layer on a projection of q)."""

    def __init__(self, store: PatternStore) -> None:
        super().__init__()
        self.reference = DilatedAttention((8, 16), (1, 2))
        self.fast = DilatedAttention((8, 16), (1, 2), implementation="fast")
        self.sparse = BlockSparseAttention("bigbird", block_size=4, num_random_blocks=1, store=store)
        self.layer = MultiheadBlockSparseAttention(16, 2, "local", block_size=4, store=store)

    def forward(self, q, k, v, key_padding_mask):
        return (self.reference(q, k, v, is_causal=True, key_padding_mask=key_padding_mask),
                self.fast(q, k, v, key_padding_mask=key_padding_mask),
                self.sparse(q, k, v, key_padding_mask=key_padding_mask),
                self.layer(q.flatten(2), key_padding_mask=key_padding_mask)[0])


def inputs(n: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, n, 2, 8, generator=gen) for _ in range(3))
    pad = torch.zeros(2, n, dtype=torch.bool)
    pad[1, n - 3:] = True
    return q, k, v, pad


def check_against_reference(module: Families, args: tuple[torch.Tensor, ...], outputs) -> None:
    """The attention outputs equal the float64 dense reference."""
    q, k, v, pad = (x.double() if x.is_floating_point() else x for x in args)
    n = q.shape[1]
    torch.testing.assert_close(outputs[0].double(), dense_dilated_attention(
        q, k, v, (8, 16), (1, 2), is_causal=True, key_padding_mask=pad), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs[1].double(), dense_dilated_attention(
        q, k, v, (8, 16), (1, 2), key_padding_mask=pad), rtol=1e-4, atol=1e-4)
    layout = generate(module.sparse.spec(n, 2))
    pairs = block_pairs(layout["kv_num_blocks"], layout["kv_indices"], n, 4).expand(2, n, n)
    torch.testing.assert_close(outputs[2].double(), dense_attention(q, k, v, weight=pairs, key_padding_mask=pad),
                               rtol=1e-4, atol=1e-4)


LOAD_PACKAGE = """
import sys, torch
import attention  # registers the attention:: operators: a process must import it before loading
runner = torch._inductor.aoti_load_package(sys.argv[1])
args = torch.load(sys.argv[2])
torch.save(runner(*args), sys.argv[3])
"""


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_aotinductor_of_every_module_family_equals_the_exported_program(dynamic, tmp_path):
    store = PatternStore(tmp_path / "store")
    module = Families(store).eval()
    example = inputs(24)
    shapes = None
    if dynamic:
        n = torch.export.Dim("n", min=8, max=256)
        shapes = ({1: n}, {1: n}, {1: n}, {1: n})
    with torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=shapes)
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
        runner = torch._inductor.aoti_load_package(package)
        for n in ([24, 13, 41] if dynamic else [24]):   # 13 and 41: a partial last block
            args = inputs(n)
            got, want = runner(*args), program.module()(*args)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            check_against_reference(module, args, got)
    if dynamic:   # the package in a fresh process, whose default store is elsewhere
        args = inputs(19)
        torch.save(args, tmp_path / "args.pt")
        subprocess.run([sys.executable, "-c", LOAD_PACKAGE, package, str(tmp_path / "args.pt"),
                        str(tmp_path / "out.pt")], check=True, timeout=300,
                       env={**os.environ, "PATTERNSTORE_DIR": str(tmp_path / "elsewhere")})
        with torch.no_grad():
            for a, b in zip(torch.load(tmp_path / "out.pt"), program.module()(*args)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_export_of_the_flex_implementation_is_refused_naming_flex(dynamic):
    """torch 2.13's export fails inside FlexAttention's residue layout: the
    module refuses first, naming flex and what to export instead; "auto"
    exports (as "fast") and equals the reference."""
    q = torch.randn(1, 48, 2, 16)
    shapes = ({1: torch.export.Dim("n", min=16, max=512)},) * 3 if dynamic else None
    with torch.no_grad(), pytest.raises(ValueError, match="implementation='flex'.*cannot be exported.*'fast'"):
        torch.export.export(DilatedAttention((16, 32), (1, 2), implementation="flex"), (q, q, q),
                            dynamic_shapes=shapes)
    auto = DilatedAttention((16, 32), (1, 2), implementation="auto")
    program = torch.export.export(auto, (q, q, q), dynamic_shapes=shapes)
    torch.testing.assert_close(program.module()(q, q, q).double(),
                               dense_dilated_attention(q.double(), q.double(), q.double(), (16, 32), (1, 2)),
                               rtol=1e-5, atol=1e-5)

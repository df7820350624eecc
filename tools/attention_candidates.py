"""The candidates of tools/bench_attention.py: each name's callable and the
useful work it is credited with. A name is ``base[-causal][:fb]``; ``:fb``
(forward+backward) is the measuring script's business, stripped before
``function``.

- ``fast``, ``reference``: ``DilatedAttention`` with that implementation;
  ``fast-grouped``, ``dapt-grouped``: the grouped scheme, ours and
  dilated-attention-pytorch's.
- ``flex``: ``DilatedAttention(implementation="flex")``, the fused path
  (one compiled FlexAttention call over the residue order, gathers in the
  graph), on natural-order inputs.
- ``flex-ordered``: ``attention.dilated.flex.dilated_flex_attention(...,
  ordered=True)`` on inputs already in residue order (``ORDERED``: the
  measuring script reorders them once, outside every timing; the output
  stays in residue order). flex minus flex-ordered is the per-layer
  permutation cost of natural order.
- ``residue-permute``: the natural path's extra work alone, eager: q, k, v
  into residue order and one tensor back (``to_residue_order`` /
  ``from_residue_order``); no useful work.
- ``gather-flash``: torchscale's algorithm (gather each branch's dilated rows
  with ``index_select``, FlashAttention per segment, scatter back, merge by
  log-sum-exp weights computed without gradient).
- ``sdpa``, ``sdpa-flash``, ``sdpa-cudnn``: dense SDPA (default dispatch,
  FlashAttention forced, cuDNN forced); ``kernel-cuda_cudnn`` /
  ``kernel-cuda_flash``: ``attention.kernels.attend`` on the same dense
  problem with that backend.
- ``-causal`` (``fast-causal``, ``flex-causal``): the module called with
  ``is_causal=True``, for the path-choice table's causal rows.

Useful work (docs/design.md section 8): 4 * head_dim * the query-key pairs
each branch selects, per head (attention/dense_reference.py's head offsets, not
the module's plan; causal: the pairs with key <= query); dense: 4 * d * n^2
* heads; forward+backward: 3x.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

import benchlib
from attention.dense_reference import head_offsets

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# Candidates that take (and return) residue-ordered tensors.
ORDERED = ("flex-ordered",)

# dapt-grouped's worker puts this module first on its path as ``xformers.ops``.
XFORMERS_STANDIN = '''"""Stand-in for xformers.ops on CPU (written by tools/bench_attention.py):
memory_efficient_attention -> torch.nn.functional.scaled_dot_product_attention."""
from typing import Any
import torch.nn.functional as F

AttentionOp = Any


class LowerTriangularMask:
    pass


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, op=None):
    # xformers layout (batch, seq, heads, dim); SDPA wants (batch, heads, seq, dim)
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        dropout_p=p, is_causal=isinstance(attn_bias, LowerTriangularMask), scale=scale,
    )
    return out.transpose(1, 2)
'''


def base_name(name: str) -> str:
    """The candidate without ``:fb``."""
    return name.split(":")[0]


def is_causal(name: str) -> bool:
    return base_name(name).endswith("-causal")


def is_ordered(name: str) -> bool:
    return base_name(name) in ORDERED


def is_flex(name: str) -> bool:
    """The fused path: compiled per shape and variant, no CPU backward."""
    return base_name(name).startswith("flex")


def selected_pairs(n: int, heads: int, segments, rates, scheme: str, causal: bool = False) -> int:
    """Query-key pairs the dilated pattern selects, over branches and heads
    (per-branch: a pair two branches select counts twice, as the per-branch
    path computes it). A segment's m selected rows give m^2 pairs, m(m+1)/2 causal."""
    def pairs(m: int) -> int:
        return m * (m + 1) // 2 if causal else m * m

    total = 0
    for (w, r), offsets in zip(zip(segments, rates), head_offsets(heads, segments, rates, scheme)):
        s = min(w, n)
        full, tail = divmod(n, s)
        total += sum(full * pairs(len(range(o, s, r))) + pairs(len(range(o, tail, r))) for o in offsets if o is not None)
    return total


def useful_flop(name: str, scheme: str, n: int, heads: int, head_dim: int, segments, rates) -> float:
    """The FLOP a candidate is credited with (module docstring); 0 for ``residue-permute``."""
    if scheme == "permutation":
        return 0.0
    pairs = n * n * heads if scheme == "dense" else selected_pairs(n, heads, segments, rates, scheme, is_causal(name))
    return 4.0 * head_dim * pairs * (3 if name.endswith(":fb") else 1)


def gather_flash(q, k, v, segments, rates):
    """The peer (torchscale's algorithm, see the module docstring); (b, n, h, d)
    in and out, n a multiple of every min(w, n)."""
    b, n, h, d = q.shape
    outs, lses = [], []
    for w, r in zip(segments, rates):
        s = min(w, n)
        group = -(-h // r)
        out = q.new_zeros(b, n, h, d)
        lse = torch.full((b, n, h), -math.inf, dtype=torch.float32, device=q.device)
        for o in range(r):
            heads = slice(o * group, min(h, (o + 1) * group))
            hg = heads.stop - heads.start
            if hg <= 0:
                continue
            within = torch.arange(o, s, r, device=q.device)
            index = (torch.arange(n // s, device=q.device)[:, None] * s + within[None]).flatten()
            parts = [x.index_select(1, index)[:, :, heads].reshape(-1, within.numel(), hg, d).transpose(1, 2)
                     for x in (q, k, v)]
            if q.device.type == "cuda":
                o_part, l_part, *_ = torch.ops.aten._scaled_dot_product_flash_attention(*parts, 0.0, False, False)
            else:
                o_part, l_part = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*parts, 0.0, False)
            out[:, index, heads] = o_part.transpose(1, 2).reshape(b, index.numel(), hg, d)
            lse[:, index, heads] = l_part.float().reshape(b, n // s, hg, -1).transpose(2, 3).reshape(b, -1, hg)
        outs.append(out)
        lses.append(lse)
    with torch.no_grad():
        weights = torch.softmax(torch.stack(lses), dim=0)
    return sum(wt.unsqueeze(-1).to(q.dtype) * o for wt, o in zip(weights, outs))


def sdpa(backend=None) -> Attention:
    """Dense SDPA on (b, n, h, d), with one SDPA backend forced (torch.nn.attention.sdpa_kernel) or not."""
    def call(q, k, v):
        args = [x.transpose(1, 2) for x in (q, k, v)]
        if backend is None:
            return F.scaled_dot_product_attention(*args).transpose(1, 2)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(*args).transpose(1, 2)
    return call


def residue_permute(rates) -> Attention:
    """The gathers natural order adds around the fused call: three in, one back (eager)."""
    from attention.residue import from_residue_order, residue_modulus, to_residue_order

    modulus = residue_modulus(rates)

    def call(q, k, v):
        ordered = [to_residue_order(x, modulus) for x in (q, k, v)]
        return from_residue_order(ordered[0], modulus)
    return call


def function(name: str, cfg: dict) -> Attention:
    """The (b, n, h, d) -> (b, n, h, d) callable of a candidate (``:fb`` stripped)."""
    segments, rates = cfg["segments"], cfg["rates"]
    if name.endswith("-causal"):
        module = benchlib.dilated_module(name[:-len("-causal")], segments, rates)
        return lambda q, k, v: module(q, k, v, is_causal=True)
    if name in ("fast", "reference", "flex"):
        return benchlib.dilated_module(name, segments, rates)
    if name == "flex-ordered":
        from attention.dilated.flex import dilated_flex_attention

        plan = benchlib.dilated_module("flex", segments, rates).plan(cfg["heads"])  # the module's plan, from the store
        return lambda q, k, v: dilated_flex_attention(q, k, v, plan, ordered=True)
    if name == "residue-permute":
        return residue_permute(rates)
    if name == "fast-grouped":
        return benchlib.dilated_module("fast", segments, rates, scheme="grouped")
    if name == "dapt-grouped":
        from dilated_attention_pytorch.dilated_attention import DilatedAttention as DaptAttention

        return DaptAttention(segments, rates)
    if name == "gather-flash":
        return lambda q, k, v: gather_flash(q, k, v, segments, rates)
    if name.startswith("kernel-"):  # one kernel of the kernel layer, chosen by its public backend name
        from attention.kernels.attend import attend

        def kernel(q, k, v, backend=name.split("-", 1)[1]):
            args = [x.transpose(1, 2) for x in (q, k, v)]
            return attend(*args, causal=False, scale=None, backend=backend)[0].transpose(1, 2)
        return kernel
    if name.startswith("sdpa"):
        from torch.nn.attention import SDPBackend

        return sdpa({"sdpa": None, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                     "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[name])
    raise ValueError(name)

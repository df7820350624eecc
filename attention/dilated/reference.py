"""The reference path of dilated attention: docs/design.md section 2.1
written out, plain and autograd-native (double backward and every
``torch.func`` transform work through it), and the one to read.

Per branch, a zero output and a -inf log-sum-exp of full size are filled
piece by piece with softmax attention over the piece's strided views; then
one softmax over the branches' log-sum-exps weights their outputs:
``O = sum_i exp(lse_i - L) O_i`` with ``L = logsumexp_i lse_i``. Padded keys
are removed (their scores -inf, their keys and values zeroed), so a NaN or
Inf in a padded key or value never reaches an output. v may have its own
head_dim (multi-head latent attention): outputs have v's. A soft-cap caps
each piece's scaled scores; sinks join the softmax over the branches as one
more part with a zero output (``attention.kernels.sinks``).

Memory: a piece's scores are materialized at most ``_REFERENCE_SCORES``
elements at a time (a few segments per step).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from attention.dilated.plan import DilatedPlan, check_plan, head_runs, pieces, view
from attention.kernels.softmax_parts import EMPTY_LSE, accumulate_dtype, lse_dtype
from attention.checks import check_attention_inputs, check_dropout, check_is_causal, check_softmax_scale, default_scale
from attention.checks import check_sinks, check_softcap
from attention.kernels.sinks import soft_cap

__all__ = ["dilated_attention_reference", "reference_attention", "softmax_lse"]

_NEG_INF = float("-inf")

# Score elements the reference materializes at once (64 Mi: 256 MiB in float32).
_REFERENCE_SCORES = 1 << 26


def softmax_lse(s: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax and log-sum-exp over the last dim, for rows that may be all
    -inf: those get probabilities 0 and lse -inf, and gradients stay finite
    (``torch.logsumexp`` and ``torch.softmax`` give NaN there)."""
    peak = s.detach().amax(-1, keepdim=True)
    peak = peak.masked_fill(peak == _NEG_INF, 0.0)
    e = (s - peak).exp()
    total = e.sum(-1, keepdim=True)
    safe = total.clamp_min(torch.finfo(total.dtype).tiny)
    lse = torch.where(total > 0, safe.log() + peak, _NEG_INF)
    return e / safe, lse.squeeze(-1)


def dilated_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: DilatedPlan,
    *,
    is_causal: bool = False,
    softmax_scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """Dilated attention by its definition (module docstring), checked
    inputs: q (b, q_len, h, d), k (b, kv_len, h_kv, d), v (b, kv_len, h_kv,
    d_v) -> (b, q_len, h, d_v). Dropout ``dropout_p`` applies to the
    attention probabilities; ``softcap`` and ``sinks`` (``(h,)``) as in
    ``attention.kernels.sinks``."""
    check_attention_inputs(q, k, v, key_padding_mask)
    check_plan(plan, q.shape[2])
    is_causal = check_is_causal(is_causal)
    scale = default_scale(q, check_softmax_scale(softmax_scale))
    return reference_attention(q, k, v, plan, is_causal, scale, key_padding_mask, check_dropout(dropout_p),
                               softcap=check_softcap(softcap), sinks=check_sinks(sinks, q))


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, plan: DilatedPlan, is_causal: bool, scale: float,
    key_padding_mask: Optional[Tensor], dropout_p: float, with_lse: bool = False,
    softcap: Optional[float] = None, sinks: Optional[Tensor] = None,
):
    """Unchecked core -> out (b, q_len, h, d_v) in q's dtype, or with
    ``with_lse`` (out, lse (b, q_len, h)), lse EMPTY_LSE where no key."""
    dtype, acc = q.dtype, accumulate_dtype(q.dtype)
    q, k, v = (x.to(acc) for x in (q, k, v))
    b, m, h, _ = q.shape
    n, group_size, d_v = k.shape[1], h // k.shape[2], v.shape[-1]
    if key_padding_mask is not None:  # removed, not only masked: 0 * NaN would reach p @ v
        keep = ~key_padding_mask[:, :, None, None]
        k, v = k.where(keep, 0.0), v.where(keep, 0.0)
    outs, lses = [], []
    for branch in sorted({g.branch for g in plan.groups}):
        out = q.new_zeros(b, m, h, d_v)
        lse = q.new_full((b, m, h), _NEG_INF)
        for g in plan.groups:
            if g.branch != branch:
                continue
            for piece in pieces(g, m, n):
                # (b, count, heads, rows, d): segments as batch, selected rows as the sequence
                qp, kp, vp = (view(x, piece, x is q).transpose(2, 3) for x in (q, k, v))
                pad = None if key_padding_mask is None else view(key_padding_mask, piece, False)[:, :, None, None, :]
                future = None
                if is_causal:  # bottom-right: query i is key k_rows - q_rows + i
                    future = torch.ones(piece.q_rows, piece.k_rows, dtype=torch.bool, device=q.device)
                    future = future.triu(piece.k_rows - piece.q_rows + 1)
                step = max(1, _REFERENCE_SCORES // max(1, b * h * piece.q_rows * piece.k_rows))  # b may be 0
                for heads, kv_heads in head_runs(g, group_size):
                    repeat = (heads.stop - heads.start) // (kv_heads.stop - kv_heads.start)
                    for t in range(0, piece.count, step):  # a few segments at a time
                        seg = slice(t, t + step)
                        ks, vs = (x[:, seg, kv_heads].repeat_interleave(repeat, dim=2) for x in (kp, vp))
                        scores = soft_cap((qp[:, seg, heads] @ ks.transpose(-1, -2)) * scale, softcap)
                        if future is not None:
                            scores = scores.masked_fill(future, _NEG_INF)
                        if pad is not None:
                            scores = scores.masked_fill(pad[:, seg], _NEG_INF)
                        p, seg_lse = softmax_lse(scores)
                        if dropout_p > 0:
                            p = F.dropout(p, dropout_p)
                        view(out, piece, True)[:, seg, :, heads] = (p @ vs).transpose(2, 3)
                        view(lse, piece, True)[:, seg, :, heads] = seg_lse.transpose(2, 3)
        outs.append(out)
        lses.append(lse)
    if sinks is not None:  # one more part: logit z_h, output 0
        lses.append(sinks.to(acc).expand(b, m, h))
    weights, total = softmax_lse(torch.stack(lses, dim=-1))  # exp(lse_i - L): (b, m, h, branches)
    out = sum(w.unsqueeze(-1) * o for w, o in zip(weights.unbind(-1), outs)).to(dtype)
    if with_lse:
        return out, total.clamp_min(EMPTY_LSE).to(lse_dtype(dtype))
    return out

"""Check every fused CUDA kernel of ``attention.kernels.KERNELS`` on its own,
forward and backward, against float64 attention on the CPU: the shapes the
dilated and block-sparse modules hand them (strided views of a longer
sequence, GQA, key masks, queries shorter than keys, causal, odd lengths, a
value head_dim of its own for the kernels whose entry takes one).

    python tools/cuda_kernels_check.py --kernel cuda_cudnn

One line per case, printed as soon as it is known (a kernel that crashes the
process still leaves the cases before it): relative errors of out, lse, dq,
dk, dv, or the exception. ``tools/gpu_check.sh`` runs it once per kernel in
its own process. ``--device cpu`` runs the survey on the CPU kernels (a check of
the script itself).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from attention.kernels.attend import KERNELS
from attention.dense_reference import dense_attention

# (name, batch, heads, kv_heads, q_len, kv_len, head_dim, causal, masked, strided, value_head_dim)
CASES = [(*case, case[6]) for case in [
    ("square", 2, 4, 4, 128, 128, 64, False, False, False),
    ("square-causal", 2, 4, 4, 128, 128, 64, True, False, False),
    ("odd-length", 1, 4, 4, 77, 77, 64, False, False, False),
    ("strided-rows", 2, 4, 4, 96, 96, 64, False, False, True),
    ("strided-causal", 2, 4, 4, 96, 96, 64, True, False, True),
    ("gqa", 2, 8, 2, 100, 100, 64, False, False, False),
    ("gqa-strided-causal", 2, 8, 2, 100, 100, 64, True, False, True),
    ("masked", 2, 4, 4, 77, 77, 64, False, True, False),
    ("masked-strided", 2, 4, 4, 77, 77, 64, False, True, True),
    ("short-queries", 2, 4, 4, 5, 300, 64, False, False, False),
    ("short-queries-masked", 2, 4, 4, 7, 531, 64, False, True, True),
    ("many-segments", 40, 4, 4, 257, 257, 64, False, False, True),
    ("d128", 1, 4, 4, 513, 513, 128, True, False, True),
]] + [
    ("mla-qk192-v128", 2, 4, 4, 77, 77, 192, True, False, False, 128),   # DeepSeek's multi-head latent attention
    ("mla-masked", 2, 4, 4, 7, 531, 192, False, True, True, 128),
]


def reference(q, k, v, do, causal: bool, scale: float, pad):
    """float64 CPU out, lse, dq, dk, dv from attention/dense_reference.py (the
    cases are square when causal, so its bottom-right causality is the fused
    kernels' top-left flag)."""
    q, k, v, do = (x.detach().double().cpu().requires_grad_(True) for x in (q, k, v, do))
    out, lse = dense_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                               key_padding_mask=None if pad is None else pad.cpu(), scale=scale, return_lse=True)
    out = out.transpose(1, 2)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do.detach())
    return out.detach(), lse.detach(), dq, dk, dv


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def run_case(kernel, case, dtype, device: str) -> str:
    name, b, h, hkv, m, n, d, causal, masked, strided, d_v = case
    g = torch.Generator(device=device).manual_seed(0)

    def make(heads, rows, width):
        if strided:  # every other row of a (b, 2 * rows, heads, width) sequence, as the dilated views
            x = torch.randn(b, 2 * rows, heads, width, device=device, dtype=dtype, generator=g)[:, ::2]
        else:
            x = torch.randn(b, rows, heads, width, device=device, dtype=dtype, generator=g)
        return x.transpose(1, 2)

    q, k, v = make(h, m, d), make(hkv, n, d), make(hkv, n, d_v)
    do = torch.randn(b, h, m, d_v, device=device, dtype=dtype, generator=g)
    scale = d ** -0.5
    pad = masked_keys = None
    if masked:  # the kernel table's convention: bool (B, 1, 1, N), True = excluded
        pad = torch.zeros(b, n, dtype=torch.bool, device=device)
        pad[:, n // 2 :] = True
        masked_keys = pad[:, None, None, :]
    out_ref, lse_ref, dq_ref, dk_ref, dv_ref = reference(q, k, v, do, causal, scale, pad)
    out, lse = kernel.forward(q, k, v, causal, scale, masked_keys, None)
    lse = lse.reshape(b, h, -1)[:, :, :m]
    synchronize(device)
    errors = [rel(out, out_ref), rel(lse.float(), lse_ref)]
    grads = kernel.backward(do, q, k, v, out_ref.to(dtype).to(device), lse_ref.float().to(device), causal, scale,
                            masked_keys, None)
    synchronize(device)
    errors += [rel(x, y) for x, y in zip(grads, (dq_ref, dk_ref, dv_ref))]
    return " ".join(f"{e:.1e}" for e in errors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", required=True, choices=sorted(KERNELS))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    kernel = KERNELS[args.kernel]
    dtypes = (torch.bfloat16, torch.float16) + ((torch.float32,) if args.kernel == "cuda_efficient" else ())
    print(f"{args.kernel}: relative errors out lse dq dk dv (bf16 operands: expect 1e-3..1e-2)", flush=True)
    worst = 0.0
    for case in CASES:
        if case[2] != case[3] and not kernel.native_gqa:
            continue
        if case[8] and not kernel.takes_mask:
            continue
        if case[10] != case[6] and not kernel.value_head_dim:
            continue
        for dtype in dtypes:
            label = f"  {case[0]:<22} {str(dtype)[6:]:<9}"
            print(label, end=" ", flush=True)
            try:
                line = run_case(kernel, case, dtype, args.device)
            except Exception as error:  # report and go on: this is a survey
                line = f"ERROR {type(error).__name__}: {str(error).splitlines()[0][:150]}"
                worst = math.inf
            else:
                worst = max([worst] + [float(x) if x != "nan" else math.inf for x in line.split()])
            print(line, flush=True)
    print(f"{args.kernel}: worst {worst:.1e}", flush=True)
    return 0 if worst < 3e-2 else 1


if __name__ == "__main__":
    sys.exit(main())

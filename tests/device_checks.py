"""What the device tests share (tests/test_cuda.py, tests/test_cuda_features.py):
the device under test, the error bounds per dtype with their reasons, and
the comparison of a device result with a float64 CPU reference.

``PATTERNSTORE_TEST_DEVICE=cpu`` puts the device tests on the CPU: a dry run
of their own logic where no GPU is lent."""

from __future__ import annotations

import os

import torch
from torch import Tensor

DEVICE = torch.device(os.environ.get("PATTERNSTORE_TEST_DEVICE", "cuda"))
HAVE_CUDA = torch.cuda.is_available()

# Largest ||got - ref|| / ||ref|| accepted, per dtype. Unit roundoff u: bf16
# 2^-8 = 3.9e-3, fp16 2^-11 = 4.9e-4. Rounding the output alone costs about
# u / sqrt(3) in this measure (2.3e-3 bf16, 2.8e-4 fp16); the fused kernels
# also round the probabilities to the input dtype before P @ V (errors that
# average over keys), and each branch merge rounds the output once more
# (it is held in the input dtype: kernels.accumulate_dtype's note). So about
# 2u is expected, and the bounds are 2.5u (bf16 1e-2) and 4u (fp16 2e-3), the
# METHOD's 1e-3..1e-2 band for bf16. float32: float32 arithmetic lands near
# 1e-6 here; 1e-4 also fails a kernel that silently computed in TF32 (~3e-4).
RELATIVE_ERROR = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
# Gradients: the backward rounds dP and dS to the input dtype before its
# matmuls, and a gradient sums two such products (dS @ K and P^T @ dO).
GRADIENT_FACTOR = 2.0


def device_tensor(*shape: int, dtype: torch.dtype, generator: torch.Generator, grad: bool = True) -> Tensor:
    x = torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)
    return x.requires_grad_(grad)


def widened(x: Tensor) -> Tensor:
    """The values the device saw, as a float64 CPU leaf for the reference."""
    return x.detach().to("cpu", torch.float64).requires_grad_(x.requires_grad)


def assert_close(got: Tensor, want: Tensor, tolerance: float, what: str, floor: float = 0.0) -> None:
    """||got - want|| <= tolerance * max(||want||, floor), every value finite."""
    got = got.detach().to("cpu", torch.float64)
    want = want.detach().to("cpu", torch.float64)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: {int((~torch.isfinite(got)).sum())} non-finite values"
    error = float((got - want).norm() / max(float(want.norm()), floor, 1e-300))
    assert error <= tolerance, f"{what}: relative error {error:.2e} > {tolerance:.1e}"


def compile_dtype() -> torch.dtype:
    return torch.bfloat16 if DEVICE.type == "cuda" else torch.float32

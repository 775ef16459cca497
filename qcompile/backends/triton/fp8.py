"""FP8 GEMM: ``y = (a_fp8 @ w_fp8^T) * s_a * s_w + b`` with ``tl.dot`` on fp8 operands (fp32
accumulation), per-tensor or per-row (token) activation scales and per-tensor or per-channel weight
scales in the epilogue. Needs an FP8 tensor-core GPU (compute capability 8.9+: Ada, Hopper); under
``TRITON_INTERPRET=1`` it runs on the CPU. The activation codes come from the canonical
``quantize`` op (PyTorch's fp8 cast), so they are the reference's codes exactly.

Products of two fp8 values are exact in fp32, so the result differs from the reference's
dequantize-then-fp32-matmul only in summation order."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .select import KernelConfig
from .w8a8 import scaled_gemm
from .weight_only import per_column

FP8_FORMATS = ("fp8_e4m3", "fp8_e5m2")


@dataclass
class PackedFp8Weight:
    """FP8 weight codes ``[K, N]`` and fp32 scales ``[N]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    n: int
    k: int

    def tensors(self) -> dict:
        return {"codes": self.codes, "scale": self.scale}


def pack_fp8_weight(q: torch.Tensor, scale: torch.Tensor) -> PackedFp8Weight:
    """From the canonical ``dequantize(q[N, K] fp8, scale [N, 1] or [], None, fmt, 0)`` operands."""
    if q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) or q.dim() != 2:
        raise ValueError(f"the FP8 GEMM needs 2-D fp8 weight codes, got {q.dtype} of rank {q.dim()}")
    n, k = q.shape
    if not (scale.numel() == 1 or (scale.dim() == 2 and scale.shape == (n, 1))):
        raise ValueError(f"the FP8 GEMM needs per-channel or per-tensor weight scales, got shape {tuple(scale.shape)}")
    return PackedFp8Weight(q.t().contiguous(), per_column(scale, n), n, k)


def fp8_linear(codes: torch.Tensor, a_scale: torch.Tensor, w: PackedFp8Weight, bias: Optional[torch.Tensor] = None,
               out_dtype: torch.dtype = torch.float32, config: Optional[KernelConfig] = None,
               interpret: bool = False, autotune: bool = False) -> torch.Tensor:
    """``F.linear(dequantize(codes fp8, a_scale), dequantize(W fp8), bias)``; ``a_scale`` 0-d or ``[..., 1]``."""
    return scaled_gemm(codes, a_scale, None, w.codes, w.scale, None, bias, w.n, w.k, out_dtype, config, interpret,
                       autotune, (codes.dtype, "fp8"))

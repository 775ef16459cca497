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
import triton
import triton.language as tl

from .select import KernelConfig, pick
from .w8a8 import scaled_epilogue
from .weight_only import per_column

FP8_FORMATS = ("fp8_e4m3", "fp8_e5m2")


@triton.jit
def _fp8_gemm_kernel(a_ptr, w_ptr, sa_ptr, sw_ptr, b_ptr, out_ptr, M, N, K, stride_am, stride_sa, stride_om,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
    scaled_epilogue(acc, sa_ptr, sw_ptr, b_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, stride_sa, stride_om, HAS_BIAS)


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
    lead = codes.shape[:-1]
    a2 = codes.reshape(-1, w.k)
    if a2.stride(-1) != 1:
        a2 = a2.contiguous()
    m = a2.shape[0]
    sa = a_scale.float().reshape(-1).contiguous()
    out = torch.empty(m, w.n, dtype=out_dtype, device=codes.device)

    def run(cfg):
        grid = (triton.cdiv(w.n, cfg.block_n), triton.cdiv(m, cfg.block_m))
        _fp8_gemm_kernel[grid](a2, w.codes, sa, w.scale, bias if bias is not None else sa, out, m, w.n, w.k,
                               a2.stride(0), 0 if sa.numel() == 1 else 1, out.stride(0), HAS_BIAS=bias is not None,
                               BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                               num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return out

    if config is None:
        config = pick("w8a8", m, w.n, w.k, 0, interpret, autotune, run, (codes.dtype, "fp8"), dot_only=True)
    return run(config).reshape(*lead, w.n)

"""W8A8 integer GEMM: ``y = ((q_a - z_a) @ q_w^T) * s_a * s_w + b`` with ``tl.dot`` int8 x int8 -> int32.

Activation codes are int8 or uint8 (a uint8 code is shifted by -128 into int8 in registers and the
shift is folded into its zero point), one scale/zero point per tensor or per token (row). Weights are
symmetric int8, per channel or per tensor, stored ``[K, N]``. The activation zero point is applied
after the integer dot through the weight column sums (``z_a * sum_k q_w[k, n]``, computed once at
lowering), so the inner loop is a pure integer MMA; scales and bias are the fp32 epilogue. The integer
sum is exact (|acc| <= K * 2^14 < 2^31 for K < 131072), so results differ from the reference's fp32
dequantize-then-matmul only by float rounding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .select import KernelConfig, pick
from .weight_only import per_column


@triton.jit
def scaled_epilogue(acc, sa_ptr, sw_ptr, b_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, stride_sa, stride_om,
                    HAS_BIAS: tl.constexpr):
    """``out = acc * s_a[m] * s_w[n] (+ b[n])``: the epilogue of the integer and FP8 GEMMs (``stride_sa``
    0 for a per-tensor activation scale, 1 per token)."""
    sa = tl.load(sa_ptr + offs_m * stride_sa, mask=mask_m, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc * sa[:, None] * sw[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def scaled_gemm_kernel(a_ptr, w_ptr, sa_ptr, za_ptr, sw_ptr, colsum_ptr, b_ptr, out_ptr,
                       M, N, K, stride_am, stride_sa, stride_om,
                       FLOAT_OPERANDS: tl.constexpr, A_UNSIGNED: tl.constexpr, HAS_ZERO: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile of ``acc = a @ w`` then :func:`scaled_epilogue`: int8 operands accumulate exactly in
    int32 (zero point through the column sums), fp8 operands (``FLOAT_OPERANDS``) in fp32."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if FLOAT_OPERANDS:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if A_UNSIGNED:
            a = (a.to(tl.int32) - 128).to(tl.int8)
        # masked weights are 0, so masked (shifted) activations add nothing
        w = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if FLOAT_OPERANDS:
            acc = tl.dot(a, w, acc)
        else:
            acc += tl.dot(a, w, out_dtype=tl.int32)
    if A_UNSIGNED or HAS_ZERO:
        za = tl.zeros((BLOCK_M,), dtype=tl.int32)
        if HAS_ZERO:
            za = tl.load(za_ptr + offs_m * stride_sa, mask=mask_m, other=0).to(tl.int32)
        if A_UNSIGNED:
            za -= 128
        acc -= za[:, None] * tl.load(colsum_ptr + offs_n, mask=mask_n, other=0)[None, :]
    scaled_epilogue(acc.to(tl.float32), sa_ptr, sw_ptr, b_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n,
                    stride_sa, stride_om, HAS_BIAS)


def scaled_gemm(codes: torch.Tensor, a_scale: torch.Tensor, a_zero: Optional[torch.Tensor], w_codes: torch.Tensor,
                w_scale: torch.Tensor, colsum: Optional[torch.Tensor], bias: Optional[torch.Tensor], n: int, k: int,
                out_dtype: torch.dtype, config: Optional[KernelConfig], interpret: bool, autotune: bool,
                cache_key: tuple) -> torch.Tensor:
    """Launch :func:`scaled_gemm_kernel` on ``codes [..., K]`` against packed ``w_codes [K, N]``;
    ``colsum`` is None for fp8 operands. ``a_scale`` is 0-d (per tensor) or one per row."""
    lead = codes.shape[:-1]
    a2 = codes.reshape(-1, k)
    if a2.stride(-1) != 1:
        a2 = a2.contiguous()
    m = a2.shape[0]
    sa = a_scale.float().reshape(-1).contiguous()
    za = None if a_zero is None else a_zero.reshape(-1).contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=codes.device)

    def run(cfg):
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
        scaled_gemm_kernel[grid](a2, w_codes, sa, za if za is not None else sa, w_scale,
                                 colsum if colsum is not None else sa, bias if bias is not None else sa, out,
                                 m, n, k, a2.stride(0), 0 if sa.numel() == 1 else 1, out.stride(0),
                                 FLOAT_OPERANDS=colsum is None, A_UNSIGNED=codes.dtype == torch.uint8,
                                 HAS_ZERO=za is not None, HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m,
                                 BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                                 num_stages=cfg.num_stages)
        return out

    if config is None:
        config = pick("w8a8", m, n, k, 0, interpret, autotune, run, cache_key, dot_only=True)
    return run(config).reshape(*lead, n)


@dataclass
class PackedInt8Weight:
    """Symmetric int8 weight codes ``[K, N]``, fp32 scales ``[N]`` and int32 column sums ``[N]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    colsum: torch.Tensor
    n: int
    k: int

    def tensors(self) -> dict:
        return {"codes": self.codes, "scale": self.scale, "colsum": self.colsum}


def pack_int8_weight(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor]) -> PackedInt8Weight:
    """From the canonical ``dequantize(q[N, K] int8, scale [N, 1] or [], None, "int8", 0)`` operands."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"W8A8 needs 2-D int8 weight codes, got {q.dtype} of rank {q.dim()}")
    if zero_point is not None and bool((zero_point != 0).any()):
        raise ValueError("W8A8 needs symmetric weights (no zero point)")
    n, k = q.shape
    if not (scale.numel() == 1 or (scale.dim() == 2 and scale.shape == (n, 1))):
        raise ValueError(f"W8A8 needs per-channel or per-tensor weight scales, got shape {tuple(scale.shape)}")
    return PackedInt8Weight(q.t().contiguous(), per_column(scale, n),
                            q.to(torch.int32).sum(1).to(torch.int32).contiguous(), n, k)


def w8a8_linear(codes: torch.Tensor, a_scale: torch.Tensor, a_zero: Optional[torch.Tensor], w: PackedInt8Weight,
                bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.float32,
                config: Optional[KernelConfig] = None, interpret: bool = False, autotune: bool = False) -> torch.Tensor:
    """``F.linear(dequantize(codes, a_scale, a_zero), dequantize(W), bias)``; ``a_scale`` is 0-d
    (per tensor) or ``[..., 1]`` (per token, one per row of ``codes``)."""
    return scaled_gemm(codes, a_scale, a_zero, w.codes, w.scale, w.colsum, bias, w.n, w.k, out_dtype, config,
                       interpret, autotune, (codes.dtype,))

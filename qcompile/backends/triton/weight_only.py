"""Weight-only GEMM/GEMV: ``y = x @ dequantize(W)^T + b`` with the weights dequantized in registers.

Families covered by one kernel (constexpr switches, so each compiles to its own specialised code):
int8/uint8 and int4/uint4 codes (two per byte), NF4 (a 16-entry code book), FP8 E4M3/E5M2 codes (W8A16 fp8), per-channel or
group-wise scales (group 32/64/128 or any size divisible by the K block; a short last group is
read like any other), with or without zero points (asymmetric).

Layout the kernel reads (built once by :func:`pack_weight` at lowering time):

* codes ``[K, N]`` (8-bit) or ``[ceil(K/2), N]`` uint8 (4-bit: row ``k // 2``, low nibble even
  ``k``), N contiguous so a K block loads coalesced rows; 4-bit codes are stored offset-binary
  (``code - qmin``, 0..15), the offset folded into the zero point;
* scales ``[G, N]`` fp32 (``G = ceil(K / group)``; ``[N]`` per channel), zero points likewise.

M = 1 runs a GEMV (broadcast multiply and a sum over K, no 16-row tile wasted); larger M a
``tl.dot`` tile. ``split_k > 1`` gives each program a K range and sums the partial tiles after.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ...formats import get_format
from .select import KernelConfig, pick

WEIGHT_FORMATS = ("int8", "uint8", "int4", "uint4", "nf4", "fp8_e4m3", "fp8_e5m2")


@triton.jit
def _weight_only_kernel(x_ptr, w_ptr, s_ptr, z_ptr, book_ptr, b_ptr, out_ptr,
                        M, N, K, K_SPLIT, stride_xm, stride_xk, stride_os, stride_om,
                        GROUP: tl.constexpr, NIBBLES: tl.constexpr, CODEBOOK: tl.constexpr, FLOAT_CODES: tl.constexpr,
                        HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GROUP == 0:  # per channel: the scale (and zero point) multiply once, after the loop
        if HAS_ZERO:
            zc = tl.load(z_ptr + offs_n, mask=mask_n, other=0.0)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        wmask = mask_k[:, None] & mask_n[None, :]
        if NIBBLES:
            packed = tl.load(w_ptr + (offs_k[:, None] // 2) * N + offs_n[None, :], mask=wmask, other=0)
            q = (packed.to(tl.int32) >> ((offs_k[:, None] % 2) * 4)) & 0xF
        elif FLOAT_CODES:  # fp8 weights: the code is the value
            q = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=wmask, other=0.0).to(tl.float32)
        else:
            q = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=wmask, other=0).to(tl.int32)
        if CODEBOOK:
            w = tl.load(book_ptr + q)
        else:
            w = q.to(tl.float32)
        if GROUP > 0:
            g = k0 // GROUP  # BLOCK_K divides GROUP: the whole block is in one group
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0)
            if HAS_ZERO:
                z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0)
                w = (w - z[None, :]) * s[None, :]
            else:
                w = w * s[None, :]
        elif HAS_ZERO:
            w = w - zc[None, :]
        w = tl.where(wmask, w, 0.0)
        if BLOCK_M == 1:  # GEMV: a dot would waste 15 of 16 rows
            xk = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None] * stride_xk,
                         mask=mask_k[:, None] & mask_m[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(xk * w, axis=0)[None, :]
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if DOT_FP32:  # fp32 activations: no TF32 rounding, the reference's numerics
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
    if GROUP == 0:
        acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@dataclass
class PackedWeight:
    """A weight in the layout :func:`weight_only_linear` reads (see the module docstring)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    codebook: Optional[torch.Tensor]
    format: str
    group: int
    n: int
    k: int

    def tensors(self) -> dict:
        return {"codes": self.codes, "scale": self.scale, "zero": self.zero, "codebook": self.codebook}


def per_column(t: torch.Tensor, n: int) -> torch.Tensor:
    """A per-tensor (0-d or one element) or per-channel (``[N, 1]``) scale or zero point as fp32 ``[N]``."""
    return t.float().reshape(-1).expand(n).contiguous()


def pack_weight(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], fmt_name: str,
                group: int) -> PackedWeight:
    """Repack ``dequantize(q[N, K], scale, zero_point, fmt, group)`` (the canonical op's operands)
    into the kernel's layout. Raises ``ValueError`` for what the kernel does not read."""
    if fmt_name not in WEIGHT_FORMATS:
        raise ValueError(f"weight format '{fmt_name}' has no Triton weight-only kernel (have {', '.join(WEIGHT_FORMATS)})")
    if q.dim() != 2:
        raise ValueError(f"weight codes of rank {q.dim()} (need [N, K])")
    fmt = get_format(fmt_name)
    n, k = q.shape
    per_row = scale.dim() == 2 and scale.shape[1] == 1 and group == 0
    if group == 0 and not (scale.dim() == 0 or per_row):
        raise ValueError(f"weight scale of shape {tuple(scale.shape)} is neither per-channel nor per-group")
    s = per_column(scale, n) if group == 0 else scale.float().t()
    z = None
    if zero_point is not None:
        z = per_column(zero_point, n) if group == 0 else zero_point.float().t()
    book = None
    if fmt.kind == "codebook":
        book = torch.tensor(fmt.codebook, dtype=torch.float32)
    if fmt.bits == 4:
        u = (q.to(torch.int16) - (0 if fmt.kind == "codebook" else int(fmt.qmin))).to(torch.uint8)
        if fmt.kind == "int" and fmt.qmin < 0:  # offset-binary codes: fold -qmin into the zero point
            z = (torch.zeros_like(s) if z is None else z) - fmt.qmin
        u = u.t().contiguous()                  # [K, N]
        if k % 2:
            u = torch.cat([u, torch.zeros(1, n, dtype=torch.uint8)])
        codes = u[0::2] | (u[1::2] << 4)        # [ceil(K/2), N]: low nibble = even k
    else:
        codes = q.t().contiguous()
    return PackedWeight(codes.contiguous(), s.contiguous(), None if z is None else z.contiguous(),
                        book, fmt_name, group, n, k)


def _launch(x2, w: PackedWeight, bias, out, cfg: KernelConfig, interpret: bool):
    m = x2.shape[0]
    k_split = -(-w.k // cfg.split_k)
    k_split = -(-k_split // cfg.block_k) * cfg.block_k  # every split starts on a K block (and group)
    split = -(-w.k // k_split)
    grid = (triton.cdiv(w.n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    dummy = w.scale
    _weight_only_kernel[grid](
        x2, w.codes, w.scale, w.zero if w.zero is not None else dummy,
        w.codebook if w.codebook is not None else dummy, bias if bias is not None else dummy, out,
        m, w.n, w.k, k_split, x2.stride(0), x2.stride(1), out.stride(0) if out.dim() == 3 else 0, out.stride(-2),
        GROUP=w.group, NIBBLES=get_format(w.format).bits == 4,
        CODEBOOK=w.codebook is not None, FLOAT_CODES=get_format(w.format).kind == "float", HAS_ZERO=w.zero is not None, HAS_BIAS=bias is not None,
        # Triton 3.9's interpreter multiplies bf16 tl.dot operands as raw integers: upcast there
        DOT_FP32=x2.dtype == torch.float32 or (interpret and x2.dtype == torch.bfloat16), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return split


def weight_only_linear(x: torch.Tensor, w: PackedWeight, bias: Optional[torch.Tensor] = None,
                       config: Optional[KernelConfig] = None, interpret: bool = False,
                       autotune: bool = False) -> torch.Tensor:
    """``F.linear(x, dequantize(W), bias)`` for ``x[..., K]`` of fp32/fp16/bf16 (output in x's dtype)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    m = x2.shape[0]
    if config is None:
        config = pick("weight_only", m, w.n, w.k, w.group, interpret, autotune,
                      lambda c: _run(x2, w, bias, c, interpret), (x.dtype,))
    return _run(x2, w, bias, config, interpret).reshape(*lead, w.n)


def _run(x2, w, bias, cfg, interpret):
    m = x2.shape[0]
    if cfg.split_k == 1:
        out = torch.empty(m, w.n, dtype=x2.dtype, device=x2.device)
        _launch(x2, w, bias, out, cfg, interpret)
        return out
    parts = torch.empty(cfg.split_k, m, w.n, dtype=torch.float32, device=x2.device)
    used = _launch(x2, w, bias, parts, cfg, interpret)
    return parts[:used].sum(0).to(x2.dtype)

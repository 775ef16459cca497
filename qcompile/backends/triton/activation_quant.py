"""Activation quantization kernels: static per-tensor (scale and zero point are constants of the
graph) and fused per-token dynamic (one pass per row block: min/max, scale, zero point, codes).

Numerics follow the canonical ops exactly (:mod:`qcompile.ops`, torchao's ``quantize_affine``):
``clamp(round_half_even(x * (1 / s)) + z, qmin, qmax)``, and for dynamic rows
``s = max((max(x, 0) - min(x, 0)) / (qmax - qmin), eps)``, ``z = clamp(qmin - round(min(x, 0) / s))``
(symmetric signed: ``s = max|x| / qmax``, ``z = 0``). Codes come out in the format's storage
dtype, so they are the reference's codes (``qcompile.verify`` compares them)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...formats import get_format
from .select import choose

ACTIVATION_FORMATS = ("int8", "uint8")


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, z_ptr, M, K, stride_xm, stride_qm,
                          QMIN: tl.constexpr, QMAX: tl.constexpr, EPS: tl.constexpr,
                          DYNAMIC: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_ZERO: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    if DYNAMIC:
        # masked lanes hold 0.0, which the range includes anyway (min(x, 0), max(x, 0))
        lo = tl.minimum(tl.min(x, axis=1), 0.0)
        hi = tl.maximum(tl.max(x, axis=1), 0.0)
        if SYMMETRIC:
            s = tl.maximum(tl.maximum(-lo, hi) / QMAX, EPS)
            z = tl.zeros_like(s)
        else:
            s = tl.maximum((hi - lo) / (QMAX - QMIN), EPS)
            z = tl.minimum(tl.maximum(QMIN - _round_half_even(lo / s), QMIN), QMAX)
        tl.store(s_ptr + offs_m, s, mask=mask_m)
        tl.store(z_ptr + offs_m, z.to(z_ptr.dtype.element_ty), mask=mask_m)
        s = s[:, None]
        z = z[:, None]
    else:
        s = tl.load(s_ptr)
        if HAS_ZERO:
            z = tl.load(z_ptr).to(tl.float32)
        else:
            z = 0.0
    v = _round_half_even(x * (1.0 / s)) + z
    v = tl.minimum(tl.maximum(v, QMIN), QMAX)
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], v.to(q_ptr.dtype.element_ty), mask=mask)


def _launch(x, fmt, scale, zero, dynamic, symmetric, interpret):
    f = get_format(fmt)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    q = torch.empty(m, k, dtype=f.storage, device=x.device)
    cfg = choose("quantize", m, 1, k, 0, interpret)
    block_k = triton.next_power_of_2(k)
    block_m = max(1, min(cfg.block_m, triton.next_power_of_2(m)))
    num_warps = cfg.num_warps
    if not interpret:  # a whole row per program: keep a program's tile near 4096 values (no spills)
        block_m = max(1, min(block_m, 4096 // block_k))
        num_warps = 8 if block_k >= 4096 else num_warps
    _quantize_rows_kernel[(triton.cdiv(m, block_m),)](
        x2, q, scale, zero if zero is not None else scale, m, k, x2.stride(0), q.stride(0),
        QMIN=f.qmin, QMAX=f.qmax, EPS=torch.finfo(torch.float32).eps, DYNAMIC=dynamic, SYMMETRIC=symmetric,
        HAS_ZERO=zero is not None, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps)
    return q.reshape(x.shape)


def quantize_static(x: torch.Tensor, scale: torch.Tensor, zero_point, fmt: str, interpret: bool = False) -> torch.Tensor:
    """Codes of ``x`` with a per-tensor (0-d) ``scale``/``zero_point``: ``qcompile.quantize``'s numerics."""
    return _launch(x, fmt, scale.float().reshape(1), None if zero_point is None else zero_point.reshape(1),
                   False, False, interpret)


def quantize_per_token(x: torch.Tensor, fmt: str, symmetric: bool, interpret: bool = False):
    """(codes, scale ``[..., 1]`` fp32, zero point ``[..., 1]`` in the format's storage): the fused
    ``choose_qparams(per_token=True)`` + ``quantize`` of the canonical ops."""
    f = get_format(fmt)
    if symmetric and not f.signed:
        raise ValueError(f"symmetric per-token '{fmt}' (a mid-range zero point) has no Triton kernel")
    lead = x.shape[:-1]
    m = max(1, x.numel() // max(x.shape[-1], 1))
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    zero = torch.empty(m, dtype=f.storage, device=x.device)
    q = _launch(x, fmt, scale, zero, True, symmetric, interpret)
    return q, scale.reshape(*lead, 1), zero.reshape(*lead, 1)

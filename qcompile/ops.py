"""The canonical quantize / dequantize ops every pass and backend speaks (``torch.ops.qcompile.*``).

Granularity is carried by the shape of ``scale`` (the same rank as ``x``, or 0-d), not by flags:

================  ==========================  ==========================
granularity       x                           scale
================  ==========================  ==========================
per-tensor        any                         ``[]`` (0-d)
per-channel       ``[N, K]`` / ``[O, I, h, w]``  ``[N, 1]`` / ``[O, 1, 1, 1]``
per-group         ``[N, K]``, ``group_size=g``   ``[N, ceil(K / g)]``
per-token         ``[B, S, K]``                 ``[B, S, 1]``
per-token-group   ``[B, S, K]``, ``group_size=g``  ``[B, S, ceil(K / g)]`` (dynamic)
================  ==========================  ==========================

With ``group_size > 0`` the last dimension is split into groups of ``g``; a last group shorter than
``g`` (576 = 4.5 x 128) is quantized as it is, never dropped. Backends read the channel axis from
the one dimension of ``scale`` larger than 1.

Example::

    >>> import torch, qcompile.ops
    >>> w = torch.randn(4, 8)
    >>> s = w.abs().amax(1, keepdim=True) / 127
    >>> q = torch.ops.qcompile.quantize(w, s, None, "int8", 0)
    >>> w_hat = torch.ops.qcompile.dequantize(q, s, None, "int8", 0, torch.float32)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .formats import get_format


def _grouped(x: torch.Tensor, scale: torch.Tensor, group_size: int):
    """View ``x`` as ``[..., G, g]`` (zero-padded) and ``scale`` as ``[..., G, 1]``."""
    k = x.shape[-1]
    groups = scale.shape[-1]
    pad = groups * group_size - k
    if pad < 0 or pad >= group_size:
        raise ValueError(f"scale has {groups} groups for a last dim of {k} and group_size {group_size}")
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], groups, group_size), scale.unsqueeze(-1), k


def _ungroup(y: torch.Tensor, k: int) -> torch.Tensor:
    y = y.reshape(*y.shape[:-2], -1)
    return y[..., :k]


@torch.library.custom_op("qcompile::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
             format: str, group_size: int) -> torch.Tensor:
    """Float → codes of ``format`` (stored as ``Format.storage``, one code per element)."""
    fmt = get_format(format)
    scale = scale.float()   # float16 scales (QuantSpec.scale_dtype) compute in float32
    if group_size > 0:
        xg, sg, k = _grouped(x, scale, group_size)
        zg = None if zero_point is None else zero_point.unsqueeze(-1)
        return _ungroup(fmt.quantize(xg, sg, zg), k).contiguous()
    return fmt.quantize(x, scale, zero_point)


def _check_groups(x, scale, group_size):
    if group_size > 0:
        k = x.shape[-1]
        torch._check(scale.shape[-1] == (k + group_size - 1) // group_size,
                     lambda: f"scale has {scale.shape[-1]} groups for a last dim of {k} and group_size {group_size}")


@quantize.register_fake
def _(x, scale, zero_point, format, group_size):
    _check_groups(x, scale, group_size)
    return torch.empty_like(x, dtype=get_format(format).storage)


@torch.library.custom_op("qcompile::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
               format: str, group_size: int, output_dtype: torch.dtype) -> torch.Tensor:
    """Codes of ``format`` → float of ``output_dtype``."""
    fmt = get_format(format)
    scale = scale.float()
    if group_size > 0:
        qg, sg, k = _grouped(q, scale, group_size)
        zg = None if zero_point is None else zero_point.unsqueeze(-1)
        return _ungroup(fmt.dequantize(qg, sg, zg, output_dtype), k).contiguous()
    return fmt.dequantize(q, scale, zero_point, output_dtype)


@dequantize.register_fake
def _(q, scale, zero_point, format, group_size, output_dtype):
    _check_groups(q, scale, group_size)
    return torch.empty_like(q, dtype=output_dtype)


@torch.library.custom_op("qcompile::choose_qparams", mutates_args=())
def choose_qparams(x: torch.Tensor, format: str, symmetric: bool,
                   per_token: bool, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic quantization parameters from the live tensor: per token (last dim reduced,
    keepdim), per token and group of ``group_size`` along the last dim (``[..., ceil(K / g)]``;
    ``per_token`` must be set) or per tensor (0-d). The zero point is always returned (zeros when
    symmetric) so the op has a fixed signature."""
    fmt = get_format(format)
    xf = x.detach().float()
    if group_size > 0:
        if not per_token:
            raise ValueError("choose_qparams: group_size needs per_token=True (one scale per token and group)")
        # the zero padding of a short last group cannot move its range: every range includes 0
        xg = _grouped(xf, xf.new_empty(-(-xf.shape[-1] // group_size)), group_size)[0]
        lo, hi = xg.amin(-1), xg.amax(-1)
    elif per_token:
        lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    elif xf.numel() == 0:  # an empty batch: any scale quantizes it (min/max of nothing would raise)
        lo = hi = xf.new_zeros(())
    else:
        lo, hi = xf.min(), xf.max()
    scale, zp = fmt.choose_qparams(lo, hi, symmetric)
    if zp is None:
        zp = torch.zeros_like(scale, dtype=fmt.storage)
    return scale, zp


@choose_qparams.register_fake
def _(x, format, symmetric, per_token, group_size=0):
    if group_size > 0:
        shape = (*x.shape[:-1], (x.shape[-1] + group_size - 1) // group_size)
    else:
        shape = (*x.shape[:-1], 1) if per_token else ()
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=get_format(format).storage)


QUANTIZE = torch.ops.qcompile.quantize.default
DEQUANTIZE = torch.ops.qcompile.dequantize.default
CHOOSE_QPARAMS = torch.ops.qcompile.choose_qparams.default

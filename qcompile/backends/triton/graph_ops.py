"""The functions a lowered graph calls (``call_function`` targets): thin wrappers from graph
tensors to the Triton kernels. They run on CUDA tensors, or on CPU tensors when Triton runs in
interpreter mode (``TRITON_INTERPRET=1`` set before triton was imported)."""
from __future__ import annotations

from typing import Optional

import torch

from ...errors import BackendError
from . import activation_quant, fp8, w8a8, weight_only

try:  # triton >= 3.2 keeps its switches in knobs; an InterpretedFunction is what jit returned
    from triton.runtime.interpreter import InterpretedFunction
    INTERPRET = isinstance(weight_only._weight_only_kernel, InterpretedFunction)
except ImportError:  # pragma: no cover - older triton layouts
    INTERPRET = False


def _check_device(t: torch.Tensor, what: str) -> None:
    if INTERPRET:
        if t.is_cuda:
            raise BackendError(f"{what}: TRITON_INTERPRET=1 runs kernels on CPU tensors, got a CUDA tensor")
    elif not t.is_cuda:
        raise BackendError(f"{what}: Triton kernels need CUDA tensors (got {t.device}); move the artifact and its "
                           "inputs with .to('cuda'), or set TRITON_INTERPRET=1 before importing triton to run "
                           "them (slowly) on the CPU")


def weight_only_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                       codebook: Optional[torch.Tensor], bias: Optional[torch.Tensor], fmt: str, group: int,
                       n: int, k: int, autotune: bool = False) -> torch.Tensor:
    """``F.linear(x, dequantize(W), bias)`` with ``W`` packed by :func:`weight_only.pack_weight`.
    ``autotune``: time the configuration table's candidates (GPU; see :mod:`.select`)."""
    _check_device(x, "weight-only linear")
    w = weight_only.PackedWeight(codes, scale, zero, codebook, fmt, group, n, k)
    return weight_only.weight_only_linear(x, w, bias, interpret=INTERPRET, autotune=autotune)


def w8a8_linear(codes: torch.Tensor, a_scale: torch.Tensor, a_zero: Optional[torch.Tensor], w_codes: torch.Tensor,
                w_scale: torch.Tensor, colsum: torch.Tensor, bias: Optional[torch.Tensor], n: int, k: int,
                out_dtype: torch.dtype, autotune: bool = False) -> torch.Tensor:
    """``F.linear(dequantize(codes), dequantize(W int8), bias)`` as an integer GEMM."""
    _check_device(codes, "W8A8 linear")
    w = w8a8.PackedInt8Weight(w_codes, w_scale, colsum, n, k)
    return w8a8.w8a8_linear(codes, a_scale, a_zero, w, bias, out_dtype, interpret=INTERPRET,
                            autotune=autotune)


def fp8_linear(codes: torch.Tensor, a_scale: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor], n: int, k: int, out_dtype: torch.dtype,
               autotune: bool = False) -> torch.Tensor:
    """``F.linear(dequantize(codes fp8), dequantize(W fp8), bias)`` as an FP8 tensor-core GEMM."""
    _check_device(codes, "FP8 linear")
    w = fp8.PackedFp8Weight(w_codes, w_scale, n, k)
    return fp8.fp8_linear(codes, a_scale, w, bias, out_dtype, interpret=INTERPRET, autotune=autotune)


def quantize_static(x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], fmt: str) -> torch.Tensor:
    """``qcompile.quantize`` with a constant per-tensor scale."""
    _check_device(x, "activation quantize")
    return activation_quant.quantize_static(x, scale, zero_point, fmt, interpret=INTERPRET)


def quantize_per_token(x: torch.Tensor, fmt: str, symmetric: bool):
    """``choose_qparams(per_token=True)`` and ``quantize`` fused: (codes, scale, zero point)."""
    _check_device(x, "dynamic activation quantize")
    return activation_quant.quantize_per_token(x, fmt, symmetric, interpret=INTERPRET)


TARGETS = (weight_only_linear, w8a8_linear, fp8_linear, quantize_static, quantize_per_token)

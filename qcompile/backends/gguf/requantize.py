"""The gguf backend's ``requantize=True`` option: a layer whose grid no GGUF type holds bit for bit
is quantized again, from qcompile's reference weight (its dequantized value, not the float model's),
to the nearest type (:func:`~.blocks.nearest_type`; llama.cpp's own fallback when a k-quant row is
not whole super-blocks), by round to nearest with the spec that equals that type
(:func:`qcompile.presets.gguf_spec`), and the error this adds to the layer's weight is reported.

The file then no longer holds the reference model bit for bit: the report names each such layer,
the grid it had, the type it got and the added error, and the contract's parity (measured by
llama.cpp on the file) includes it.
"""
from __future__ import annotations

import torch

from ...formats import SUPER_BLOCK, TWO_LEVEL, get_format, two_level_quantize, two_level_values
from ...observers import weight_qparams
from ...ops import DEQUANTIZE, QUANTIZE
from ...presets import gguf_spec
from .blocks import QuantizedWeight, nearest_type
from .kquants import FALLBACK


def value_of(weight: QuantizedWeight) -> torch.Tensor:
    """The weight the reference backend computes with (float32 ``[N, K]``)."""
    return DEQUANTIZE(weight.codes, weight.scale, weight.zero_point, weight.format, weight.group_size, torch.float32)


def target_type(weight: QuantizedWeight) -> str:
    """The type a refused weight is requantized to: the nearest, or llama.cpp's fallback for it when
    the row is not a whole number of k-quant super-blocks."""
    want = nearest_type(weight)
    return FALLBACK[want] if want in FALLBACK and weight.codes.shape[1] % SUPER_BLOCK else want


def quantize_to(layer: str, value: torch.Tensor, gguf_type: str) -> QuantizedWeight:
    """``value`` ``[N, K]`` rounded to nearest on the grid of ``gguf_type`` (two-level scales for
    the k-quants, as the convert pass builds them), as a :class:`~.blocks.QuantizedWeight`."""
    spec = gguf_spec(gguf_type)
    scale, zp = weight_qparams(value, spec)
    two = None
    if spec.scale_dtype in TWO_LEVEL:
        codes, sup = two_level_quantize(scale, spec.scale_dtype, spec.group_size)
        scale = two_level_values(codes, sup, spec.group_size)
        two = {"scale_dtype": spec.scale_dtype, "scale_codes": codes, "scale_super": sup}
        if zp is not None:
            mcodes, msup = two_level_quantize(zp, spec.zero_point_dtype, spec.group_size)
            zp = two_level_values(mcodes, msup, spec.group_size, torch.float64)
            two.update(zero_point_dtype=spec.zero_point_dtype, min_codes=mcodes, min_super=msup)
    codes = QUANTIZE(value, scale, zp, spec.format, spec.group_size)
    return QuantizedWeight(layer, spec.format, spec.group_size, codes, scale, zp, two)


def requantize(weight: QuantizedWeight, why: str) -> tuple[QuantizedWeight, dict]:
    """``weight`` requantized to its :func:`target_type`, and the report entry: the grid it had,
    why no type holds it, the type it got and the error added to its reference weight (relative
    RMS, max |diff|, SQNR in dB)."""
    gguf_type = target_type(weight)
    ref = value_of(weight)
    new = quantize_to(weight.layer, ref, gguf_type)
    diff = value_of(new) - ref
    err, norm = diff.pow(2).sum().sqrt().item(), ref.pow(2).sum().sqrt().item()
    sqnr = float("inf") if err == 0 else 20 * torch.log10(torch.tensor(norm / err)).item()
    return new, {"grid": weight.grid(), "why": why, "type": gguf_type, "added_rel_rms": err / max(norm, 1e-30),
                 "added_max_abs": diff.abs().max().item(), "added_sqnr_db": sqnr,
                 "bits": get_format(new.format).bits}

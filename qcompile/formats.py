"""The format table: one record per number format, the one place a format is defined.

A :class:`Format` knows its range, how its codes are stored in a graph (``storage``), how they are
packed on disk (``pack``/``unpack``: sub-byte codes really take ``bits`` bits), how to pick a scale
and zero point from a range, and its reference quantize/dequantize. Passes, observers, backends and
tests look formats up here by id (``"int8"``, ``"int4"``, ``"fp8_e4m3"``, ``"nf4"``); tests iterate
:data:`FORMATS`, so a new row gets its round-trip tests for free.

Example::

    >>> from qcompile.formats import get_format
    >>> fmt = get_format("int4")
    >>> fmt.qmin, fmt.qmax, fmt.bits
    (-8.0, 7.0, 4)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .errors import QuantizationError, RecipeError, closest

# bitsandbytes' NF4 code book: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

_EPS = torch.finfo(torch.float32).eps

# Zero point dtypes that hold the group minimum m itself (x = s q + m, llama.cpp's form) rather
# than an offset z (x = (q - z) s): float16 (Q4_1/Q5_1's m) and float64, the exact value of a
# k-quant's two-level minimum -dmin * code (up to 17 significant bits: no float16 holds it, and
# float32 already means an offset). See two_level_quantize.
MINIMUM_DTYPES = (torch.float16, torch.float64)

# The largest |x| a range may reach: above it float32 overflows in ``max - min`` or in
# ``(code - zero_point) * scale`` (an unsigned symmetric grid reaches 1 + 1/(2^bits - 1) times the
# range), and the round trip would return Inf. choose_qparams raises QuantizationError instead.
MAX_ABS = 2.0 ** 125


@dataclass(frozen=True)
class Format:
    """One number format.

    ``kind`` is ``"int"`` (affine integer codes), ``"float"`` (a low-precision float scaled by
    ``scale``) or ``"codebook"`` (indices into ``codebook``, scaled by ``scale``).
    """

    name: str
    kind: str
    bits: int
    qmin: float
    qmax: float
    storage: torch.dtype
    description: str
    codebook: Optional[tuple] = field(default=None, repr=False)
    mantissa_bits: int = 0  # float kinds only: sets the relative rounding error

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def supports_asymmetric(self) -> bool:
        return self.kind == "int"

    @property
    def nonfinite(self) -> str:
        """What this format does with NaN and ±Inf (the one place it is decided; docs/formats.md).

        A range (the min/max a scale is chosen from) with NaN, ±Inf or ``|x| > MAX_ABS`` has no
        scale in any format: :meth:`choose_qparams` raises :class:`QuantizationError` (the
        observers name the layer even earlier). Values quantized with a finite scale: ±Inf
        saturates to the end codes in every format; NaN propagates in the float formats (FP8 has a
        NaN code, like the float model) and raises :class:`QuantizationError` in integer and code
        book formats, which have no code for it (a cast would write an arbitrary code)."""
        if self.kind == "float":
            return "NaN -> NaN code; +-Inf -> +-max * scale"
        return "NaN -> QuantizationError; +-Inf -> end codes"

    # -- qparams ---------------------------------------------------------------------------
    def choose_qparams(self, min_val: torch.Tensor, max_val: torch.Tensor, symmetric: bool,
                       scale_dtype: torch.dtype = torch.float32, float_zero_point: bool = False):
        """Scale and zero point (``None`` when symmetric around 0) covering ``[min_val, max_val]``.

        ``float_zero_point`` (asymmetric integer formats): the range is not widened to include 0
        and the zero point is the float ``qmin - min/scale``, so ``qmin`` decodes to the minimum
        exactly (``x = s q + m``, llama.cpp's Q4_1 / K-quant form; ``QuantSpec.zero_point_dtype``).

        Symmetric integer scales map ``max|x|`` to ``qmax`` so nothing is clipped and 0 is exact.
        ``scale_dtype=torch.float16``: the scale is rounded *up* to a float16 value (so the range
        is still covered) and the zero point is computed from that rounded scale; the returned
        scale is float32 holding float16 values (the caller stores it as float16).
        """
        if float_zero_point:
            if symmetric or self.kind != "int":
                raise RecipeError("zero_point_dtype", f"a float zero point needs an asymmetric integer format, "
                                  f"not '{self.name}'{' (symmetric)' if symmetric else ''}")
            _check_range(self.name, min_val, max_val)
            lo, hi = min_val.float(), max_val.float()
            scale = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(_EPS)
            if scale_dtype != torch.float32:
                scale = _round_up_to(scale, scale_dtype)
            return scale, self.qmin - lo / scale
        if scale_dtype != torch.float32:
            scale, zp = self.choose_qparams(min_val, max_val, symmetric)
            rounded = _round_up_to(scale, scale_dtype)
            if zp is not None and not symmetric:
                lo = torch.minimum(min_val.float(), torch.zeros_like(min_val, dtype=torch.float32))
                zp = (self.qmin - torch.round(lo / rounded)).clamp(self.qmin, self.qmax).to(self.storage)
            return rounded, zp
        _check_range(self.name, min_val, max_val)
        min_val = torch.minimum(min_val.float(), torch.zeros_like(min_val, dtype=torch.float32))
        max_val = torch.maximum(max_val.float(), torch.zeros_like(max_val, dtype=torch.float32))
        if symmetric or not self.supports_asymmetric:
            if not symmetric:
                raise RecipeError("symmetric", f"format '{self.name}' is symmetric only")
            amax = torch.maximum(-min_val, max_val)
            if self.kind == "int" and not self.signed:
                # unsigned symmetric: centre the range on the middle code (torch's convention)
                scale = (amax / ((self.qmax - self.qmin) / 2)).clamp_min(_EPS)
                zp = torch.full_like(scale, (self.qmin + self.qmax + 1) // 2).to(self.storage)
                return scale, zp
            top = 1.0 if self.kind == "codebook" else self.qmax  # code books span [-1, 1]
            return (amax / top).clamp_min(_EPS), None
        scale = ((max_val - min_val) / (self.qmax - self.qmin)).clamp_min(_EPS)
        zp = (self.qmin - torch.round(min_val / scale)).clamp(self.qmin, self.qmax)
        return scale, zp.to(self.storage)

    # -- reference numerics (scale/zero point broadcastable to x) ---------------------------
    def quantize(self, x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor]):
        if self.kind != "float" and torch.isnan(x).any():
            raise QuantizationError(f"format '{self.name}' has no code for NaN ({int(torch.isnan(x).sum())} of "
                                    f"{x.numel()} values are NaN)")
        if self.kind == "int" and zero_point is not None and zero_point.dtype in MINIMUM_DTYPES:
            # a float16 (or float64) zero point is the group minimum m itself (llama.cpp's Q4_1/Q5_1
            # and k-quants): x = s q + m
            q = torch.round((x.float() - zero_point.float()) / scale)
            return q.clamp(self.qmin, self.qmax).to(self.storage)
        if self.kind == "int" and zero_point is not None and zero_point.is_floating_point():
            # a float zero point: round(x/s + z), so it shifts the grid by a fraction of a step
            # (torchao's integer path rounds x/s first and would round z away)
            q = torch.round(x.float() / scale + zero_point.float())
            return q.clamp(self.qmin, self.qmax).to(self.storage)
        if self.kind == "int":
            from torchao.quantization.quant_primitives import quantize_affine

            scale, zero_point = _as_same_rank(x, scale, zero_point)
            return quantize_affine(x, _block_size(x, scale), scale, zero_point, self.storage,
                                   int(self.qmin), int(self.qmax))
        if self.kind == "float":
            return (x.float() / scale).clamp(self.qmin, self.qmax).to(self.storage)
        book = torch.tensor(self.codebook, dtype=torch.float32)
        mid = (book[1:] + book[:-1]) / 2  # decision boundaries between neighbouring codes
        return torch.bucketize((x.float() / scale).clamp(-1, 1), mid).to(self.storage)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                   dtype: torch.dtype = torch.float32):
        if self.kind == "int" and zero_point is not None and zero_point.dtype in MINIMUM_DTYPES:
            # s q + m in float32: q s is exact (a float16 scale times a code of <= 13 bits), then one
            # rounding, as llama.cpp's dequantize_row_q4_1 and gguf.quants compute it (bit-exact)
            return (q.float() * scale.float() + zero_point.float()).to(dtype)
        if self.kind == "int" and zero_point is not None and zero_point.is_floating_point():
            return ((q.float() - zero_point.float()) * scale.float()).to(dtype)
        if self.kind == "int":
            from torchao.quantization.quant_primitives import dequantize_affine

            scale, zero_point = _as_same_rank(q, scale, zero_point)
            # torchao has no float64 output: a k-quant minimum (float64) is computed in float32, exactly
            out = torch.float32 if dtype == torch.float64 else dtype
            return dequantize_affine(q, _block_size(q, scale), scale, zero_point, self.storage,
                                     int(self.qmin), int(self.qmax), output_dtype=out).to(dtype)
        if self.kind == "float":
            return (q.float() * scale).to(dtype)
        book = torch.tensor(self.codebook, dtype=torch.float32)
        return (book[q.long()] * scale).to(dtype)

    def error_bound(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Largest round-trip error allowed for in-range ``x`` (the registry-driven tests use it)."""
        if self.kind == "int":
            # half a step, plus float32 rounding of x / scale near a rounding tie (relative to |x|)
            return scale / 2 * (1 + 1e-5) + x.abs() * 2.0 ** -20
        if self.kind == "float":
            tiny = torch.finfo(self.storage).smallest_normal
            return torch.maximum(x.abs() * 2.0 ** -(self.mantissa_bits + 1), tiny * scale) * (1 + 1e-5)
        book = torch.tensor(self.codebook)
        return scale * (book[1:] - book[:-1]).max() / 2 * (1 + 1e-5)

    # -- storage ------------------------------------------------------------------------------
    def packed_nbytes(self, numel: int) -> int:
        """Bytes the codes of ``numel`` values take on disk."""
        return math.ceil(numel * self.bits / 8)

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        """Codes → a flat ``uint8`` tensor of :meth:`packed_nbytes` bytes (bit-exact round trip)."""
        if self.bits == 8:
            return q.contiguous().view(torch.uint8).flatten()
        codes = (q.to(torch.int16) - int(self.qmin)).to(torch.uint8).flatten().numpy()
        bits = np.unpackbits(codes[:, None], axis=1)[:, 8 - self.bits:]  # MSB-first bit planes
        return torch.from_numpy(np.packbits(bits.reshape(-1)))

    def unpack(self, packed: torch.Tensor, shape) -> torch.Tensor:
        """Inverse of :meth:`pack`."""
        numel = math.prod(shape)
        if self.bits == 8:
            return packed.view(self.storage).reshape(shape).clone()
        bits = np.unpackbits(packed.numpy())[: numel * self.bits].reshape(numel, self.bits)
        codes = np.packbits(np.pad(bits, ((0, 0), (8 - self.bits, 0))), axis=1).reshape(-1)
        return (torch.from_numpy(codes).to(torch.int16) + int(self.qmin)).to(self.storage).reshape(shape)


DOUBLE_QUANT_BLOCK = 256


def double_quantize_scales(scale: torch.Tensor, block: int = DOUBLE_QUANT_BLOCK):
    """bitsandbytes' double quantization of per-group scales (QLoRA, Dettmers et al. 2023): the
    flattened scales minus their mean, in blocks of ``block``, as int8 codes with one float32 scale
    per block. Returns ``(codes[M] int8, block_scales[ceil(M/block)] float32, offset 0-d float32)``;
    ``dequantize(codes, block_scales, None, "int8", block) + offset`` gives the scales back.
    bitsandbytes maps the 8-bit codes through its dynamic float code book; these are linear
    int8 codes of the same size (8 bits per scale, 32 bits per block of 256)."""
    flat = scale.detach().float().reshape(-1)
    offset = flat.mean()
    centred = flat - offset
    blocks = -(-flat.numel() // block)
    padded = torch.nn.functional.pad(centred, (0, blocks * block - flat.numel())).reshape(blocks, block)
    int8 = FORMATS["int8"]
    amax = padded.abs().amax(1)
    block_scales, _ = int8.choose_qparams(-amax, amax, True)
    codes = torch.ops.qcompile.quantize(centred, block_scales, None, "int8", block)
    return codes, block_scales, offset


def rebuild_scales(codes: torch.Tensor, block_scales: torch.Tensor, offset: torch.Tensor, shape,
                   block: int = DOUBLE_QUANT_BLOCK, floor: Optional[float] = torch.finfo(torch.float32).tiny):
    """The values a graph rebuilds from :func:`double_quantize_scales`' output (what the weight's
    codes are computed against): ``clamp_min(reshape(dequantize(codes) + offset), floor)``. The
    tiny floor is for scales: a block's rounding must never make a scale <= 0; ``floor=None`` for
    values that may be negative (float zero points)."""
    deq = torch.ops.qcompile.dequantize(codes, block_scales, None, "int8", block, torch.float32)
    out = (deq + offset).reshape(shape)
    return out if floor is None else out.clamp_min(floor)


def scale_grid(scale: torch.Tensor, scale_dtype: str, group_size: int = 0) -> torch.Tensor:
    """The scales a weight is really quantized with once stored as ``scale_dtype`` (a
    :data:`~qcompile.spec.SCALE_DTYPES` name): ``"int8"`` double-quantizes them
    (:func:`double_quantize_scales` then :func:`rebuild_scales`, deterministic, so convert and
    GPTQ/AWQ get the same grid from the same float scales); other dtypes are already rounded by
    ``choose_qparams``. The k-quant dtypes (:data:`TWO_LEVEL`) need the weight's ``group_size``."""
    if scale_dtype in TWO_LEVEL:
        return two_level_values(*two_level_quantize(scale, scale_dtype, group_size), group_size)
    if scale_dtype != "int8":
        return scale
    return rebuild_scales(*double_quantize_scales(scale), scale.shape)


def float16_minimum(scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """A float zero point ``z`` (``x = (q - z) s``) as the float16 group minimum ``m = -z s``
    (``x = s q + m``): what ``zero_point_dtype: float16`` stores, llama.cpp's Q4_1/Q5_1 ``m``. The
    canonical ops read a float16 zero point as that minimum."""
    return (-zero_point.float() * scale.float()).half()


def kquant_minimum(scale: torch.Tensor, zero_point: torch.Tensor, fmt: "Format"):
    """A float zero point's range ``[m, m + (qmax - qmin) s]`` (``m = -z s``) as a k-quant holds it:
    the minimum is never above 0 (llama.cpp stores ``-dmin * code``, ``dmin, code >= 0``), so a range
    above 0 is widened down to 0 and the scale grows to keep its top. Returns ``(scale, m)``, ``m``
    float64 (a minimum, :data:`MINIMUM_DTYPES`), both before the two-level rounding."""
    s = scale.float()
    lo = -zero_point.float() * s
    hi = lo + (fmt.qmax - fmt.qmin) * s
    lo = lo.clamp_max(0)
    return ((hi - lo) / (fmt.qmax - fmt.qmin)).clamp_min(_EPS), lo.double()


def zero_point_as_offset(scale: torch.Tensor, zero_point: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A float16 minimum ``m`` (:func:`float16_minimum`) as the float32 zero point ``z = -m / s``
    for code that rounds ``x/s + z`` inline (GPTQ's column loop); other zero points unchanged."""
    if zero_point is None or zero_point.dtype not in MINIMUM_DTYPES:
        return zero_point
    return -zero_point.float() / scale.float()


def zero_point_grid(zero_point: Optional[torch.Tensor], zero_point_dtype: str,
                    group_size: int = 0) -> Optional[torch.Tensor]:
    """The zero points a weight is really quantized with once stored as ``zero_point_dtype`` (a
    :data:`~qcompile.spec.ZERO_POINT_DTYPES` name): ``"int8"`` double-quantizes the float zero
    points like :func:`scale_grid` does scales (no floor: they may be negative); the others are
    stored as they are. ``"kquant6"``: the minimum on its two-level grid (:func:`two_level_quantize`,
    float64, needs ``group_size``)."""
    if zero_point is not None and zero_point_dtype in TWO_LEVEL:
        return two_level_values(*two_level_quantize(zero_point, zero_point_dtype, group_size), group_size,
                                torch.float64)
    if zero_point is None or zero_point_dtype != "int8":
        return zero_point
    return rebuild_scales(*double_quantize_scales(zero_point), zero_point.shape, floor=None)


# llama.cpp's k-quants store a weight's per-group scales (and minima) as small codes against one
# float16 scale per super-block of 256 weights of a row (``ggml-common.h``): scale_dtype /
# zero_point_dtype name -> the format of those codes. "kquant6": 6-bit codes (Q4_K / Q5_K's
# ``scales``, their minima against ``dmin``); "kquant8": 8-bit codes (Q6_K's int8 ``scales``);
# "kquant4": 4-bit codes (Q2_K's scales and minima); "kquant6s": signed 6-bit codes (Q3_K's scales).
TWO_LEVEL = {"kquant6": "uint6", "kquant8": "int8", "kquant4": "uint4", "kquant6s": "int6"}
SUPER_BLOCK = 256


def two_level_quantize(values: torch.Tensor, dtype: str, group_size: int):
    """Per-group scales ``[N, G]`` (positive) or minima (``<= 0``: a float64 or float16 zero point,
    ``x = s q + m``) as llama.cpp's k-quants store them: codes of ``TWO_LEVEL[dtype]`` and one
    float16 super-scale per ``256 / group_size`` groups of a row (the last super-block of a row that
    is not a multiple of 256 is shorter; the gguf backend then refuses the layer). The super-scale is
    ``max / code_max`` rounded up to float16 (no code clips); a scale's code is at least 1 (a group
    never collapses to zero). Minima are coded as ``-m`` against a *negative* super-scale ``-dmin``,
    so the rebuilt value is ``code * super`` either way. Returns ``(codes [N, G], super [N, S] float16)``."""
    if dtype not in TWO_LEVEL:
        raise RecipeError("scale_dtype", f"'{dtype}' is not a two-level (k-quant) dtype; {closest(dtype, TWO_LEVEL)}")
    if not group_size or SUPER_BLOCK % group_size:
        raise RecipeError("group_size", f"{dtype} scales need a group size dividing {SUPER_BLOCK}, got {group_size}")
    fmt = FORMATS[TWO_LEVEL[dtype]]
    v = values.detach().float()
    minimum = values.dtype in MINIMUM_DTYPES
    if minimum:
        v = -v
    if v.dim() != 2 or bool((v < 0).any()):
        what = "minima must be <= 0" if minimum else "scales must be >= 0"
        raise QuantizationError(f"{dtype} two-level scales: expected [rows, groups] values; {what}")
    per = SUPER_BLOCK // group_size
    n, g = v.shape
    blocks = -(-g // per)
    padded = torch.nn.functional.pad(v, (0, blocks * per - g)).reshape(n, blocks, per)
    sup = _round_up_to(padded.amax(-1) / fmt.qmax, torch.float16)
    lo = 0 if minimum else 1
    codes = torch.round(v / sup.repeat_interleave(per, 1)[:, :g]).clamp(lo, fmt.qmax).to(fmt.storage)
    return codes, (-sup if minimum else sup).half()


def two_level_values(codes: torch.Tensor, super_scale: torch.Tensor, group_size: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The scales (``float32``) or minima (``float64``) :func:`two_level_quantize`'s output stands for:
    ``code * super`` with the canonical dequantize op (what the converted graph computes; exact,
    a float16 times a code of at most 8 bits)."""
    fmt = "int8" if codes.dtype == torch.int8 else "uint6"   # (int6 codes: the same values as int8)
    return torch.ops.qcompile.dequantize(codes, super_scale, None, fmt, SUPER_BLOCK // group_size, dtype)


def _check_range(name: str, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
    """A :class:`QuantizationError` when ``[min_val, max_val]`` has no finite scale (see ``Format.nonfinite``)."""
    lo, hi = min_val.detach().float(), max_val.detach().float()
    ok = torch.isfinite(lo) & torch.isfinite(hi) & (lo.abs() <= MAX_ABS) & (hi.abs() <= MAX_ABS)
    if not bool(ok.all()):
        i = int(torch.argmin(ok.reshape(-1).to(torch.uint8)))
        lo_bad, hi_bad = lo.reshape(-1)[i].item(), hi.reshape(-1)[i].item()
        what = "NaN" if math.isnan(lo_bad) or math.isnan(hi_bad) else (
            "Inf" if math.isinf(lo_bad) or math.isinf(hi_bad) else f"a magnitude above {MAX_ABS:.3g}")
        raise QuantizationError(f"format '{name}': the range [{lo_bad:.6g}, {hi_bad:.6g}] contains {what}, "
                                "which no scale can cover; check the data for NaN/Inf or overflow")


def _round_up_to(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` rounded up to the nearest value of ``dtype`` (and at least its smallest normal)."""
    info = torch.finfo(dtype)
    low = scale.clamp(info.smallest_normal, info.max).to(dtype)
    up = torch.nextafter(low, torch.tensor(info.max, dtype=dtype))
    return torch.where(low.float() < scale, up, low).float()


def _as_same_rank(x, scale, zero_point):
    # torchao wants scale/zero point with one entry per block and a zero point even when symmetric
    if scale.dim() == 0:
        scale = scale.reshape([1] * x.dim())
    if zero_point is None:
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    elif zero_point.dim() == 0:
        zero_point = zero_point.reshape([1] * x.dim())
    return scale, zero_point


def _block_size(x, scale):
    return tuple(xs // ss for xs, ss in zip(x.shape, scale.shape))


def _int(name: str, bits: int, signed: bool) -> Format:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    storage = torch.int8 if signed else torch.uint8
    kind = "signed" if signed else "unsigned"
    return Format(name, "int", bits, float(lo), float(hi), storage, f"{bits}-bit {kind} integer")


def _float8(name: str, dtype: torch.dtype, mantissa: int, what: str) -> Format:
    info = torch.finfo(dtype)
    return Format(name, "float", 8, float(-info.max), float(info.max), dtype, what, mantissa_bits=mantissa)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        _int("int8", 8, True),
        _int("uint8", 8, False),
        _int("int4", 4, True),
        _int("uint4", 4, False),
        _int("int3", 3, True),
        _int("uint3", 3, False),
        _int("uint5", 5, False),
        _int("uint6", 6, False),
        _int("int6", 6, True),
        _int("int2", 2, True),
        _int("uint2", 2, False),
        _float8("fp8_e4m3", torch.float8_e4m3fn, 3, "FP8 E4M3 (finite, max 448)"),
        _float8("fp8_e5m2", torch.float8_e5m2, 2, "FP8 E5M2 (max 57344)"),
        Format("nf4", "codebook", 4, 0.0, 15.0, torch.uint8,
               "4-bit NormalFloat (bitsandbytes code book), absmax-scaled", codebook=NF4_CODEBOOK),
    )
}


def get_format(name: str, field: str = "format") -> Format:
    """The format named ``name``; a :class:`RecipeError` naming ``field`` when there is none."""
    try:
        return FORMATS[name]
    except KeyError:
        raise RecipeError(field, f"unknown format '{name}'; {closest(name, FORMATS)}") from None

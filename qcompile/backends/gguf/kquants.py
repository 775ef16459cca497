"""llama.cpp's k-quants as one table: which qcompile grid each holds bit for bit, and the packer
that writes qcompile's codes and two-level scales into its super-blocks of 256 weights.

======  =============================================  =============================================
type    value of code ``u`` in sub-block ``j``          qcompile grid that equals it
======  =============================================  =============================================
Q4_K    ``d * sc[j] * u - dmin * m[j]``, u 4-bit        uint4, groups of 32, ``scale_dtype`` and
        ``sc, m`` 6-bit, sub-blocks of 32               ``zero_point_dtype: kquant6``
Q5_K    the same, u 5-bit                              uint5, the same
Q6_K    ``d * sc[j] * (u - 32)``, u 6-bit, ``sc`` int8,  int6 symmetric, groups of 16,
        sub-blocks of 16                               ``scale_dtype: kquant8``
Q2_K    ``d * sc[j] * u - dmin * m[j]``, u 2-bit,       uint2, groups of 16, ``scale_dtype`` and
        ``sc, m`` 4-bit, sub-blocks of 16              ``zero_point_dtype: kquant4``
Q3_K    ``d * sc[j] * (u - 4)``, u 3-bit, ``sc`` signed  int3 symmetric, groups of 16,
        6-bit, sub-blocks of 16                        ``scale_dtype: kquant6s``
======  =============================================  =============================================

``d`` and ``dmin`` are float16, one per super-block of 256 weights of a row (``ggml-common.h``);
qcompile's two-level scales (:func:`qcompile.formats.two_level_quantize`) are those codes and
float16 super-scales (a minimum's super-scale is ``-dmin``), and its dequantize computes ``s q + m``
with ``s = d * sc`` and ``m = -dmin * m`` exactly as llama.cpp (and ``gguf.quants``) do, so the
stored blocks dequantize to qcompile's reference weight bit for bit. Rows must be a whole number
of super-blocks; llama.cpp's quantizer falls back to :data:`FALLBACK` for the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ...errors import BackendError
from ...formats import SUPER_BLOCK, get_format

# llama.cpp's tensor_type_fallback (src/llama-quant.cpp): the type a row that is not a multiple of
# 256 gets instead
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class KQuantType:
    """One k-quant: the qcompile grid it holds (code format, group, two-level dtypes) and bytes per
    super-block of 256."""

    name: str
    format: str
    group_size: int
    scale_dtype: str
    zero_point_dtype: Optional[str]   # None: symmetric (no minimum)
    block_bytes: int

    def pack(self, u: np.ndarray, sc: np.ndarray, d: np.ndarray, mn: Optional[np.ndarray],
             dmin: Optional[np.ndarray]) -> np.ndarray:
        """Unsigned codes ``u [rows, K]``, sub-block scale codes ``sc [rows, K/group]``, float16
        super-scales ``d [rows, K/256]`` (and minimum codes / ``dmin`` for Q4_K/Q5_K) → blocks
        ``[rows, K/256 * block_bytes]`` uint8 in llama.cpp's byte layout."""
        rows, k = u.shape
        nb = k // SUPER_BLOCK
        ub = u.reshape(rows * nb, SUPER_BLOCK).astype(np.uint8)
        half = d.astype(np.float16).reshape(-1, 1).view(np.uint8)
        per = SUPER_BLOCK // self.group_size
        if self.name == "Q3_K":
            s6 = (sc.reshape(-1, per).astype(np.int16) + 32).astype(np.uint8)   # 6-bit scales stored + 32
            low = (s6[:, :8] & 0x0F) | ((s6[:, 8:] & 0x0F) << 4)
            high = ((s6.reshape(-1, 4, 4) >> 4) & 3) << (2 * np.arange(4, dtype=np.uint8))[None, :, None]
            scales = np.concatenate([low, high.sum(1, dtype=np.uint8)], axis=1)
            hmask = (((ub.reshape(-1, 8, 32) >> 2) & 1) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)
            q = ub.reshape(-1, 2, 4, 32) & 3   # qs: the low two bits, as Q2_K
            qs = (q << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2, dtype=np.uint8).reshape(-1, 64)
            out = np.concatenate([hmask, qs, scales, half], axis=1)
        elif self.name == "Q2_K":   # scales: a 4-bit scale code (low) and minimum code (high) per sub-block
            scales = (sc.reshape(-1, per).astype(np.uint8) & 0x0F) | (mn.reshape(-1, per).astype(np.uint8) << 4)
            q = ub.reshape(-1, 2, 4, 32) & 3   # qs: per 128, byte l holds code l + 32 s at bits 2 s
            qs = (q << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2, dtype=np.uint8).reshape(-1, 64)
            out = np.concatenate([scales, qs, half, dmin.astype(np.float16).reshape(-1, 1).view(np.uint8)], axis=1)
        elif self.name == "Q6_K":
            q = ub.reshape(-1, 2, 2, 64)    # ql: per 128, byte l holds codes l (low) and l + 64 (high)
            ql = ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(-1, 128)
            hi = (ub.reshape(-1, 2, 4, 32) >> 4) & 3   # qh: per 128, byte l holds bits 4-5 of l + 32 s at 2 s
            qh = (hi << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2, dtype=np.uint8).reshape(-1, 64)
            scales = sc.astype(np.int8).reshape(-1, per).view(np.uint8)
            out = np.concatenate([ql, qh, scales, half], axis=1)
        else:
            s, m = sc.reshape(-1, per).astype(np.uint8), mn.reshape(-1, per).astype(np.uint8)
            packed = np.concatenate([(s[:, :4] & 63) | ((s[:, 4:] >> 4) << 6),     # 6-bit scales and minima
                                     (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),     # of 8 sub-blocks in 12 bytes
                                     (s[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)], axis=1)
            parts = [half, dmin.astype(np.float16).reshape(-1, 1).view(np.uint8), packed]
            if self.name == "Q5_K":   # qh: byte l holds the fifth bit of code l + 32 j at bit j
                hi = ((ub.reshape(-1, 8, 32) >> 4) & 1).astype(np.uint8)
                parts.append((hi << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8))
            q = ub.reshape(-1, 4, 2, 32)    # qs: per 64, byte l holds codes l (low) and l + 32 (high)
            parts.append(((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(-1, 128))
            out = np.concatenate(parts, axis=1)
        assert out.shape[1] == self.block_bytes
        return out.reshape(rows, nb * self.block_bytes)


# llama.cpp's super-block sizes (GGML_QUANT_SIZES): the packer asserts them
K_TYPES = {t.name: t for t in (
    KQuantType("Q2_K", "uint2", 16, "kquant4", "kquant4", 84),
    KQuantType("Q3_K", "int3", 16, "kquant6s", None, 110),
    KQuantType("Q4_K", "uint4", 32, "kquant6", "kquant6", 144),
    KQuantType("Q5_K", "uint5", 32, "kquant6", "kquant6", 176),
    KQuantType("Q6_K", "int6", 16, "kquant8", None, 210),
)}


def k_type_of(fmt: str, group_size: int, scale_dtype: str, zero_point_dtype: Optional[str]) -> Optional[KQuantType]:
    """The k-quant whose grid is ``fmt`` in groups of ``group_size`` with these two-level dtypes."""
    return next((t for t in K_TYPES.values() if (t.format, t.group_size, t.scale_dtype, t.zero_point_dtype)
                 == (fmt, group_size, scale_dtype, zero_point_dtype)), None)


def match_k(weight, refuse) -> tuple[KQuantType, np.ndarray]:
    """``weight`` (a :class:`~.blocks.QuantizedWeight` with two-level scales) as the k-quant
    holding it and its packed blocks; ``refuse(weight, why)`` builds the :class:`BackendError`."""
    two = weight.two_level
    ktype = k_type_of(weight.format, weight.group_size, two["scale_dtype"], two.get("zero_point_dtype"))
    if ktype is None:
        raise refuse(weight, "llama.cpp's k-quants are Q4_K/Q5_K (uint4/uint5 in groups of 32, kquant6 scales and "
                             "minima), Q6_K (int6 symmetric in groups of 16, kquant8 scales) and Q2_K (uint2 in "
                             "groups of 16, kquant4 scales and minima)")
    n, k = weight.codes.shape
    if k % SUPER_BLOCK:
        raise BackendError(f"layer '{weight.layer}': no GGUF block type holds its grid ({weight.grid()}) bit for bit: "
                           f"a row of {k} is not a whole number of {ktype.name} super-blocks of {SUPER_BLOCK}; "
                           f"the nearest type is {FALLBACK[ktype.name]}, llama.cpp's own fallback for {ktype.name} "
                           "(qcompile.presets.llama_cpp_mix gives it such layers)")
    codes = weight.codes.numpy().astype(np.int16)
    u = (codes - int(get_format(ktype.format).qmin)).astype(np.uint8)
    sc = two["scale_codes"].numpy()
    d = two["scale_super"].numpy().astype(np.float16)
    mn = dmin = None
    if ktype.zero_point_dtype is not None:
        mn = two["min_codes"].numpy()
        dmin = (-two["min_super"].float()).numpy().astype(np.float16)   # qcompile keeps -dmin
    return ktype, ktype.pack(u, sc, d, mn, dmin)

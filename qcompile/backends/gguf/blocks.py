"""llama.cpp's legacy block types as one table: which qcompile grid each holds bit for bit, and
the packer that writes qcompile's codes, scales and minima into its blocks.

Every type here is 32 weights per block with a float16 scale ``d``, in llama.cpp's layout
(``ggml-common.h``; the ``gguf`` package's ``gguf.quants`` reads them back):

======  ==============================================  ======================================
type    value of code ``u`` (unsigned, ``bits`` wide)    qcompile grid that equals it
======  ==============================================  ======================================
Q8_0    ``d * (u - 128)``  (int8 codes)                 int8 symmetric / uint8 symmetric (zp 128)
Q4_0    ``d * (u - 8)``                                 int4 symmetric / uint4 symmetric (zp 8)
Q5_0    ``d * (u - 16)``                                uint5 symmetric (zp 16)
Q4_1    ``d * u + m``  (``m`` float16)                  uint4, ``zero_point_dtype: float16``
Q5_1    ``d * u + m``                                   uint5, ``zero_point_dtype: float16``
======  ==============================================  ======================================

all per group of 32 with float16 scales (``scale_dtype: float16``). A qcompile code ``q`` of a
format with range ``qmin..qmax`` and integer zero point ``z`` is ``u = q - qmin`` with offset
``z - qmin``; the grids are equal when that offset is the type's and the scale is a float16 value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ...errors import BackendError
from ...formats import get_format

GROUP = 32


@dataclass(frozen=True)
class BlockType:
    """One llama.cpp block type: ``bits`` per code, ``offset`` subtracted from the unsigned code
    (``None``: a float16 minimum ``m`` is added instead), bytes per block of 32."""

    name: str
    bits: int
    offset: Optional[int]
    block_bytes: int

    @property
    def minimum(self) -> bool:
        return self.offset is None

    def pack(self, u: np.ndarray, d: np.ndarray, m: Optional[np.ndarray]) -> np.ndarray:
        """Unsigned codes ``u [rows, K]`` (uint8), scales ``d [rows, K/32]`` and minima (float16)
        → blocks ``[rows, K/32 * block_bytes]`` uint8, llama.cpp's byte layout."""
        rows, k = u.shape
        nb = k // GROUP
        ub = u.reshape(rows * nb, GROUP).astype(np.uint8)
        parts = [d.astype(np.float16).reshape(-1, 1).view(np.uint8)]
        if self.minimum:
            parts.append(m.astype(np.float16).reshape(-1, 1).view(np.uint8))
        if self.bits == 8:
            parts.append((ub.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
        else:
            if self.bits == 5:   # the fifth bits: bit j of a little-endian uint32 is code j's
                hi = ((ub >> 4) & 1).astype(np.uint32) << np.arange(GROUP, dtype=np.uint32)
                parts.append(hi.sum(axis=1, dtype=np.uint32).astype("<u4").reshape(-1, 1).view(np.uint8))
            lo = ub & 0x0F   # byte j: code j in the low nibble, code j + 16 in the high one
            parts.append((lo[:, :16] | (lo[:, 16:] << 4)).astype(np.uint8))
        out = np.concatenate(parts, axis=1)
        assert out.shape[1] == self.block_bytes
        return out.reshape(rows, nb * self.block_bytes)


# llama.cpp's block sizes (GGML_QUANT_SIZES): the packer asserts them
BLOCK_TYPES = {t.name: t for t in (
    BlockType("Q8_0", 8, 128, 34),
    BlockType("Q4_0", 4, 8, 18),
    BlockType("Q4_1", 4, None, 20),
    BlockType("Q5_0", 5, 16, 22),
    BlockType("Q5_1", 5, None, 24),
)}
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@dataclass
class QuantizedWeight:
    """One quantized weight as the converted graph holds it: codes ``[N, K]``, float scales
    ``[N, G]`` (or ``[N, 1]``), the zero point (``None``, integer codes, or a float16 minimum)."""

    layer: str
    format: str
    group_size: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    # k-quants (two-level scales, kquants.py): {"scale_dtype", "scale_codes" [N, G], "scale_super" [N, K/256]
    # float16, and with a minimum "zero_point_dtype", "min_codes", "min_super" (-dmin)}; None otherwise
    two_level: Optional[dict] = None
    # why no GGUF type can hold it, found before packing (bitsandbytes-style double-quantized scales,
    # whose values ``scale`` / ``zero_point`` then hold); None otherwise
    refused: Optional[str] = None

    def grid(self) -> str:
        zp = "no zero point" if self.zero_point is None else (
            f"{self.zero_point.dtype} zero point (minimum)" if self.zero_point.dtype == torch.float16 else
            f"{self.zero_point.dtype} zero point" if self.zero_point.is_floating_point() else "integer zero point")
        group = f"groups of {self.group_size}" if self.group_size else "one scale per row"
        if self.two_level:
            zp = f"{self.two_level['zero_point_dtype']} minima" if self.two_level.get("zero_point_dtype") else zp
            return f"{self.format}, {group}, {self.two_level['scale_dtype']} two-level scales, {zp}"
        return f"{self.format}, {group}, {self.scale.dtype} scales, {zp}"

    def permute_rows(self, perm: torch.Tensor) -> "QuantizedWeight":
        """Rows reordered (llama.cpp's Q/K rotary permutation): codes, scales and zero points together."""
        zp = self.zero_point
        if zp is not None and zp.dim() and zp.shape[0] == self.codes.shape[0]:
            zp = zp[perm]
        two = None if self.two_level is None else {
            key: v[perm] if isinstance(v, torch.Tensor) else v for key, v in self.two_level.items()}
        return QuantizedWeight(self.layer, self.format, self.group_size, self.codes[perm], self.scale[perm], zp, two)


def nearest_type(weight: QuantizedWeight) -> str:
    """The llama.cpp type closest to a grid none holds: by bits, minimum or not."""
    bits = get_format(weight.format).bits
    if weight.two_level:
        return "Q6_K" if bits >= 6 else ("Q5_K" if bits == 5 else "Q4_K" if bits == 4 else "Q3_K" if bits == 3 else "Q2_K")
    minimum = weight.zero_point is not None and weight.zero_point.is_floating_point()
    if bits <= 4:
        return "Q4_1" if minimum or weight.zero_point is not None else "Q4_0"
    if bits == 5:
        return "Q5_1" if minimum else "Q5_0"
    return "Q8_0"


def refusal(weight: QuantizedWeight, why: str) -> BackendError:
    return BackendError(f"layer '{weight.layer}': no GGUF block type holds its grid ({weight.grid()}) bit for bit: "
                        f"{why}; the nearest type is {nearest_type(weight)} (a gguf-* preset targets it exactly), "
                        "or keep the layer float with an override")


def match(weight: QuantizedWeight) -> tuple[BlockType, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """The block type holding ``weight`` bit for bit and its ``(type, u, d, m)``, or a
    :class:`BackendError` naming the layer, its grid and the nearest type."""
    fmt = get_format(weight.format)
    if fmt.kind != "int":
        raise refusal(weight, f"'{fmt.name}' is not an integer grid")
    n, k = weight.codes.shape
    if weight.group_size != GROUP:
        raise refusal(weight, f"llama.cpp's legacy blocks are groups of {GROUP}")
    if k % GROUP:
        raise refusal(weight, f"a row of {k} is not a whole number of blocks of {GROUP}")
    s = weight.scale.float()
    if s.shape != (n, k // GROUP):
        raise refusal(weight, f"scales of shape {tuple(s.shape)}, not one per block")
    if not bool((s.half().float() == s).all()) or not bool(torch.isfinite(s.half()).all()):
        raise refusal(weight, "its scales are not float16 values (use scale_dtype: float16)")
    u = (weight.codes.to(torch.int16) - int(fmt.qmin))
    zp = weight.zero_point
    if zp is not None and zp.dtype == torch.float16:   # the minimum form, x = s q + m
        if fmt.qmin != 0:
            raise refusal(weight, "a minimum with signed codes")
        btype = next((t for t in BLOCK_TYPES.values() if t.minimum and t.bits == fmt.bits), None)
        if btype is None:
            raise refusal(weight, f"no {fmt.bits}-bit type with a minimum")
        m = zp.expand(n, k // GROUP).numpy()
    elif zp is not None and zp.is_floating_point():
        raise refusal(weight, "a float32 zero point (x = (q - z) s) is not llama.cpp's minimum; "
                              "use zero_point_dtype: float16 (stored as the minimum)")
    else:
        offset = (0 if zp is None else zp.to(torch.int16)) - int(fmt.qmin)
        offsets = torch.as_tensor(offset).unique().tolist()
        btype = next((t for t in BLOCK_TYPES.values() if not t.minimum and t.bits == fmt.bits
                      and offsets == [t.offset]), None)
        if btype is None:
            raise refusal(weight, f"codes offset by {offsets[:3]} from {fmt.bits}-bit unsigned; llama.cpp's symmetric "
                                  "types offset by 8 (Q4_0), 16 (Q5_0) or 128 (Q8_0)")
        m = None
    return btype, u.to(torch.uint8).numpy(), s.numpy().astype(np.float16), m

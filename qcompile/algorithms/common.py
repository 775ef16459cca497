"""What GPTQ and AWQ share: the statistics of a Linear's input (:class:`InputStats`), quantizing a
weight onto the grid convert will store (:func:`fake_quantize`) and which weight specs they can
solve (:func:`unsupported`).

Imports only :mod:`~qcompile.distributed`, :mod:`~qcompile.formats`, :mod:`~qcompile.ops` and
:mod:`~qcompile.spec`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import distributed
from ..formats import get_format, scale_grid, zero_point_grid
from ..ops import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE
from ..spec import QuantSpec


def op_group_size(spec: QuantSpec) -> int:
    """The ``group_size`` argument of the canonical ops for ``spec`` (0 unless per group)."""
    return spec.group_size if spec.granularity == "per_group" else 0


def fake_quantize(w: torch.Tensor, spec: QuantSpec, scale, zero_point) -> torch.Tensor:
    """``dequantize(quantize(w))`` with the canonical ops (the numerics the graph will run): with
    double-quantized scales or zero points (``scale_dtype``/``zero_point_dtype: int8``) on the grid
    of the values as convert stores them."""
    g = op_group_size(spec)
    scale = scale_grid(scale, spec.scale_dtype, spec.group_size)
    zero_point = zero_point_grid(zero_point, spec.zero_point_dtype, spec.group_size)
    q = QUANTIZE(w, scale, zero_point, spec.format, g)
    return DEQUANTIZE(q, scale, zero_point, spec.format, g, torch.float32)


def quantize_input(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``dequantize(quantize(x))`` of a Linear's input under its dynamic activation ``spec``, with
    the ops and arguments convert puts in the graph (:class:`~qcompile.passes.ConvertPass`), so
    GPTQ's Hessian is of the very input the quantized matmul reads."""
    extra = (spec.group,) if spec.group else ()
    s, z = CHOOSE_QPARAMS(x, spec.format, spec.symmetric, spec.per_token, *extra)
    return DEQUANTIZE(QUANTIZE(x, s, z, spec.format, spec.group), s, z, spec.format, spec.group, x.dtype)


def unsupported(spec: Optional[QuantSpec]) -> Optional[str]:
    """Why GPTQ/AWQ cannot solve this weight spec (None when they can): they handle integer and
    code-book weights per channel or per group (double-quantized scales included: they solve against
    the grid of the scales as stored, :func:`~qcompile.formats.scale_grid`)."""
    if spec is None or get_format(spec.format).kind not in ("int", "codebook") \
            or spec.granularity not in ("per_channel", "per_group"):
        return "needs an int or code-book weight per channel/group"
    return None


@dataclass
class InputStats:
    """Running sums over the rows ``x [T, K]`` of one Linear input, added item by item: the Gram
    matrix ``XᵀX`` (float32 products, float64 sum) and ``Σ|x|`` per channel. GPTQ's Hessian is
    ``2 XᵀX / T``; AWQ's searches measure output errors as ``tr(D XᵀX Dᵀ)``, so neither needs the
    rows themselves, and the calibration rows are never concatenated."""

    gram: torch.Tensor
    abs_sum: torch.Tensor
    rows: int = 0

    @classmethod
    def of(cls, x: torch.Tensor) -> InputStats:
        """Statistics of the rows of ``x [..., K]``."""
        k = x.shape[-1]
        st = cls(torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))
        st.add(x)
        return st

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x [..., K]``."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.gram.add_(x.t() @ x)   # promoted to float64 in place: the sum a .double() copy would give
        self.abs_sum += x.abs().sum(0).double()
        self.rows += x.shape[0]

    def all_reduce(self) -> None:
        """Sum the statistics of every rank of the active process group into this one (row
        counts summed too, so :meth:`hessian` is ``2 XᵀX / T`` over all ranks' rows); no-op in one
        process (:mod:`qcompile.distributed`)."""
        if distributed.group() is None:
            return
        self.gram = distributed.all_reduce(self.gram, "sum")
        self.abs_sum = distributed.all_reduce(self.abs_sum, "sum")
        self.rows = distributed.sum_int(self.rows)

    def hessian(self) -> torch.Tensor:
        """GPTQ's ``H = 2 XᵀX / T`` (float64)."""
        return self.gram * (2.0 / self.rows)

    def take_hessian(self) -> torch.Tensor:
        """:meth:`hessian` made in place on the Gram matrix, which these statistics give up (at
        K = 8192 a K x K float64 is 512 MiB: one less alive)."""
        h, self.gram = self.gram, None
        return h.mul_(2.0 / self.rows)

    def mean_gram(self) -> torch.Tensor:
        """``XᵀX / T`` (float32)."""
        return (self.gram / self.rows).float()

    def mean_abs(self) -> torch.Tensor:
        """``mean_t |x_t|`` per channel (float32)."""
        return (self.abs_sum / self.rows).float()

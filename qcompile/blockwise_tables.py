"""The embedding and LM-head steps of layer-by-layer quantization (:mod:`qcompile.blockwise`), done
row chunk by row chunk so that no float32 copy of the whole table is ever made.

Why a step of its own: a Llama-3.2-3B embedding is 128256 x 3072 — 1.6 GB in float32, more than
half of the 3 GB budget — and the generic pipeline (capture, convert, measure, save) holds the float
weight, its quantized codes, a dequantized copy for the report and the smoke run's dequantized
copy at once. But a per-channel or per-group weight format with float scales is *row-separable*:
each row's scale, zero point and codes depend on that row alone. So the rows are read from the
memory-mapped shard a chunk at a time (in the checkpoint's dtype, upcast to float32 per chunk: the
same values the whole-model path quantizes), quantized with the same
:func:`~qcompile.observers.weight_qparams` and :data:`~qcompile.ops.QUANTIZE`, and written into
the preallocated codes; the weight SQNR of the report is accumulated chunk by chunk. The codes are
the whole-model path's, bit for bit (checked in ``tests/test_blockwise.py``).

The programs saved keep memory bounded at run time too: the embedding gathers the code rows of the
ids first and dequantizes only those (a per-row dequantize commutes with the gather, bit for bit);
the head computes the logits one chunk of vocabulary rows at a time.

Steps that do not fit this (an activation format, a per-tensor scale, double-quantized or
two-level scales, a weight algorithm on an untied head) take the generic pipeline:
:func:`row_separable` says which.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .capture import capture
from .measure import _spec_name
from .model import QuantizedModel
from .observers import weight_qparams
from .ops import DEQUANTIZE, QUANTIZE
from .recipe import LayerConfig, Recipe
from .report import LayerReport, Report, sqnr_from_energy

ROWS_PER_CHUNK = 8192


def row_separable(cfg: Optional[LayerConfig]) -> bool:
    """Whether ``cfg`` quantizes a weight row by row independently: weight-only, per channel or
    per group, float scales and zero points (a double-quantized or two-level scale spans rows)."""
    if cfg is None or cfg.weight is None or cfg.activation is not None:
        return False
    w = cfg.weight
    return w.granularity in ("per_channel", "per_group") and w.scale_dtype == "float32" and \
        w.zero_point_dtype in ("code", "float32")


class RowCodes:
    """A table quantized row chunk by row chunk: ``codes``, ``scale``, ``zero_point`` (or None) and
    the weight's signal and error energies (its SQNR)."""

    def __init__(self, shard: Path, key: str, spec, rows_per_chunk: int = ROWS_PER_CHUNK):
        from safetensors import safe_open

        self.spec, self.signal, self.noise = spec, 0.0, 0.0
        self.group = spec.group_size if spec.granularity == "per_group" else 0
        with safe_open(str(shard), framework="pt") as f:
            n, k = f.get_slice(key).get_shape()
        self.shape = (n, k)
        self.codes = self.scale = self.zero_point = None
        for r0 in range(0, n, rows_per_chunk):
            # reopened per chunk: the pages of the memory-mapped shard leave the RSS with the mapping
            with safe_open(str(shard), framework="pt") as f:
                w = f.get_slice(key)[r0:r0 + rows_per_chunk].float()
            self._put(r0, w)

    def _put(self, r0: int, w: torch.Tensor) -> None:
        s, z = weight_qparams(w, self.spec, 0)
        q = QUANTIZE(w, s, z, self.spec.format, self.group)
        if self.codes is None:   # dtypes from the first chunk
            n = self.shape[0]
            self.codes = torch.empty((n, q.shape[1]), dtype=q.dtype)
            self.scale = torch.empty((n, *s.shape[1:]), dtype=s.dtype)
            self.zero_point = None if z is None else torch.empty((n, *z.shape[1:]), dtype=z.dtype)
        r1 = r0 + w.shape[0]
        self.codes[r0:r1], self.scale[r0:r1] = q, s
        if z is not None:
            self.zero_point[r0:r1] = z
        err = w - DEQUANTIZE(q, s, z, self.spec.format, self.group, torch.float32)
        self.signal += float(w.double().pow(2).sum())
        self.noise += float(err.double().pow(2).sum())

    def dequantize(self, rows) -> torch.Tensor:
        """The float32 rows ``rows`` (an index tensor or a slice)."""
        z = None if self.zero_point is None else self.zero_point[rows]
        return DEQUANTIZE(self.codes[rows], self.scale[rows], z, self.spec.format, self.group, torch.float32)

    def layer_report(self, layer: str, op: str) -> LayerReport:
        """The report row of the layer: weight SQNR and stored bytes."""
        from .formats import get_format

        n = get_format(self.spec.format).packed_nbytes(self.codes.numel()) + self.scale.nbytes + \
            (0 if self.zero_point is None else self.zero_point.nbytes)
        return LayerReport(layer, op, _spec_name(self.spec), None, weight_sqnr=sqnr_from_energy(self.signal, self.noise),
                           weight_bytes_float=4 * math.prod(self.shape), weight_bytes_quantized=n)


class _Codes(nn.Module):
    """The quantized table as buffers (what the saved program stores as packed codes)."""

    def __init__(self, rc: RowCodes):
        super().__init__()
        self.register_buffer("weight_q", rc.codes)
        self.register_buffer("weight_scale", rc.scale)
        self.register_buffer("weight_zero_point", rc.zero_point)
        self.format, self.group = rc.spec.format, rc.group

    def rows(self, index):
        z = None if self.weight_zero_point is None else self.weight_zero_point[index]
        return DEQUANTIZE(self.weight_q[index], self.weight_scale[index], z, self.format, self.group, torch.float32)


class QuantizedEmbedding(nn.Module):
    """``model.embed_tokens`` quantized: the code rows of the ids are gathered, then dequantized."""

    def __init__(self, rc: RowCodes):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = _Codes(rc)

    def forward(self, input_ids):
        return self.model.embed_tokens.rows(input_ids)


class QuantizedHead(nn.Module):
    """The final norm (float) and ``lm_head`` quantized; the logits are computed ``chunk`` rows of
    the vocabulary at a time, so at most that many rows are dequantized at once."""

    def __init__(self, norm: nn.Module, rc: RowCodes, chunk: int = ROWS_PER_CHUNK):
        super().__init__()
        self.model = nn.Module()
        self.model.norm = norm
        self.lm_head = _Codes(rc)
        self.chunk, self.vocab = chunk, rc.shape[0]

    def forward(self, hidden_states):
        x = self.model.norm(hidden_states)
        return torch.cat([F.linear(x, self.lm_head.rows(slice(r0, min(r0 + self.chunk, self.vocab))))
                          for r0 in range(0, self.vocab, self.chunk)], dim=-1)


def table_step(module: nn.Module, rc: RowCodes, layer: str, op: str, recipe: Recipe, example: tuple,
               seconds_rows: float, tied: Optional[dict] = None) -> QuantizedModel:
    """Capture the quantized ``module`` (an embedding or a head built on ``rc``) into a
    :class:`~qcompile.model.QuantizedModel` whose report names the layer with its weight SQNR;
    ``tied``: the report's ``tied_weights`` entry of a tied head."""
    t0 = time.perf_counter()
    cap = capture(module, example)
    row = rc.layer_report(layer, op)
    report = Report(recipe=recipe.name, layers=[row], tied_weights=dict(tied or {}),
                    linear_weight_bytes_before=row.weight_bytes_float if op == "linear" else 0,
                    linear_weight_bytes_after=row.weight_bytes_quantized if op == "linear" else 0,
                    bytes_before=row.weight_bytes_float, bytes_after=row.weight_bytes_quantized)
    report.timings_s = {"quantize_rows": seconds_rows, "capture": time.perf_counter() - t0}
    return QuantizedModel(cap.graph_module, cap.binder, recipe, report,
                          (cap.example_args, cap.example_kwargs, cap.dynamic_shapes))


def gather_rows(shard: Path, key: str, ids: list[torch.Tensor], rows_per_chunk: int = ROWS_PER_CHUNK) -> list:
    """``table[ids]`` in float32 for each tensor of ``ids``, reading the table ``key`` of ``shard``
    one chunk of rows at a time (never the whole table)."""
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        n, k = f.get_slice(key).get_shape()
    outs = [torch.empty((*t.shape, k), dtype=torch.float32) for t in ids]
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, n)
        picks = [(t >= r0) & (t < r1) for t in ids]
        if not any(bool(p.any()) for p in picks):
            continue
        with safe_open(str(shard), framework="pt") as f:
            w = f.get_slice(key)[r0:r1].float()
        for t, p, o in zip(ids, picks, outs):
            o[p] = w[t[p] - r0]
    return outs
